"""Summarise a `py-spy record --native -f raw` profile of a relay worker by layer and by function.

Each raw line is one distinct stack (root first, `;`-separated frames, each `name (file:line)`)
and its sample count. A sample's *layer* is decided by walking from the leaf towards the root and
taking the first frame that says where the time is: a syscall wrapper (read, write, epoll), the
OpenSSL libraries, one of our hot-path functions or modules, asyncio, uvloop's extension.
Interpreter internals (allocation, eval loop, refcounting, struct) are charged to the Python frame
that called them. Samples of other threads (the mesh liveness thread, asleep) are left out, and
the loop thread in epoll_pwait is idle: shares are given of all samples and of busy ones.

    .venv/bin/python bench/pyspy_layers.py bench/results/.../ours-pyspy.txt
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path
from typing import Any

IDLE = "idle: epoll_pwait"
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
SYSCALL_LAYERS = {
    "read": "syscall read", "__libc_read": "syscall read", "recv": "syscall read",
    "write": "syscall write", "__libc_write": "syscall write", "writev": "syscall write",
    "send": "syscall write", "sendmsg": "syscall write",
    "epoll_wait": IDLE, "epoll_pwait": IDLE,
}
#: our functions by what they do in the relay hot path; the rest by module
FUNCTION_LAYERS = {
    "DerpServerConn.data_received": "our dispatch: data_received",
    "ServerSession.receive_data": "our dispatch: data_received",
    "ServerSession._handle_frames": "our dispatch: _handle_frames (per-packet loop, lookup, RecvPacket parts)",
    "ServerSession._deliver_routed": "our output: deliver_frames (transport.write)",
    "ServerSession.deliver_frames": "our output: deliver_frames (transport.write)",
    "Router_route": "our compiled loop (_fastpath.c)",
    "Router_take": "our compiled loop (_fastpath.c)",
    "mesh_frames": "our compiled loop (_fastpath.c)",
    "FrameParser.feed": "our frame parser: FrameParser.feed",
    "Relay.note_delivery": "our relay bookkeeping: note_delivery",
}
MODULE_LAYERS = {
    "relay_worker/": "our other relay_worker code",
    "/mesh/": "our mesh (directory, liveness)",
    "/asyncio/": "asyncio (Python)",
    "/ssl.py": "ssl (Python)",
    "/uvicorn/": "uvicorn",
}


def parse_frame(text: str) -> tuple[str, str, str]:
    match = FRAME.match(text.strip())
    if not match:
        return text.strip(), "", ""
    return match["name"], match["file"], match["line"] or ""


def layer_of(frames: list[tuple[str, str, str]]) -> str:
    for name, file, _ in reversed(frames):
        if name in SYSCALL_LAYERS:
            return SYSCALL_LAYERS[name]
        if "libssl" in file or "libcrypto" in file:
            return "OpenSSL (libssl/libcrypto)"
        if file.startswith("_ssl"):
            return "ssl module (C, _ssl.c)"
        if name in FUNCTION_LAYERS:
            return FUNCTION_LAYERS[name]
        for marker, layer in MODULE_LAYERS.items():
            if marker in file:
                return layer
        if "uvloop" in file or file.startswith(("loop.c", "sslproto")) or name.startswith(("uv_", "uv__", "UV")):
            return "uvloop/libuv (C)"
    return "other (interpreter, libc)"


def layers_key_is_busy(frames: list[tuple[str, str, str]]) -> bool:
    return layer_of(frames) != IDLE


def summarise_raw(path: Path) -> dict[str, Any]:
    layers: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    #: the deepest frame of ours in each busy sample, by line: C work it called is charged there
    our_lines: collections.Counter[str] = collections.Counter()
    samples = other_threads = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [parse_frame(frame) for frame in stack.split(";")]
        if any(name == "Thread._bootstrap" for name, _, _ in frames):
            other_threads += count  # the mesh's liveness thread, asleep; not the event loop
            continue
        samples += count
        layers[layer_of(frames)] += count
        ours = [frame for frame in frames if "relay_worker/" in frame[1]]
        if ours and layers_key_is_busy(frames):
            name, file, line_no = ours[-1]
            our_lines[f"{name} ({Path(file).name}:{line_no})"] += count
        leaf = frames[-1]
        own[f"{leaf[0]} ({Path(leaf[1]).name}:{leaf[2]})" if leaf[2] else f"{leaf[0]} ({Path(leaf[1]).name})"] += count
        for name in {f"{name} ({Path(file).name})" for name, file, _ in frames}:
            total[name] += count

    def share(counter: collections.Counter[str], limit: int) -> list[list[Any]]:
        return [[key, round(100 * value / samples, 1)] for key, value in counter.most_common(limit)]

    busy = samples - layers[IDLE]
    busy_layers = {key: round(100 * value / busy, 1) for key, value in layers.most_common() if key != IDLE}
    return {"samples": samples, "other_thread_samples": other_threads,
            "idle_share": round(100 * layers[IDLE] / samples, 1), "busy_layers": busy_layers,
            "our_lines_of_busy": [[key, round(100 * value / busy, 1)] for key, value in our_lines.most_common(20)],
            "layers": dict(share(layers, 50)), "own": share(own, 25), "total": share(total, 30)}


def main() -> int:
    for name in sys.argv[1:]:
        print(json.dumps(summarise_raw(Path(name)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
