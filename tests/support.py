"""Helpers for tests that run real `cluster up` processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cluster.status import fetch_unix
from relay_worker import frames as F
from relay_worker.handshake import ClientInfo, seal_client_info
from relay_worker.keys import PrivateKey


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_range(count: int, host: str = "127.0.0.1") -> int:
    """A base port such that base..base+count-1 are all free right now (for per-worker mesh ports)."""
    for _ in range(200):
        base = free_port(host=host)
        socks = []
        try:
            for offset in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((host, base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll predicate until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def await_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                      what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


class ClusterProcess:
    """A `cluster up` subprocess on a free loopback port, with its own state and run dirs."""

    def __init__(self, *args: str, workers: int = 1, port: int | None = None, env: dict[str, str] | None = None,
                 state_dir: Path | None = None, stun: bool = False) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="derp-test-")
        self.state_dir = state_dir or Path(self.tmp.name) / "state"
        self.run_dir = Path(self.tmp.name) / "run"
        self.port = port or free_port()
        self.stun_port = free_port(socket.SOCK_DGRAM) if stun else 0
        self.workers = workers
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "cluster", "up", "--listen", f"127.0.0.1:{self.port}",
               "--workers", str(self.workers), "--state-dir", str(self.state_dir), "--run-dir", str(self.run_dir)]
        cmd += ["--stun", f"127.0.0.1:{self.stun_port}"] if self.stun_port else ["--no-stun"]
        return cmd + self.args

    def start(self, wait: bool = True) -> ClusterProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        self._reader = threading.Thread(target=self._drain_output, daemon=True)
        self._reader.start()
        if wait:
            wait_until(lambda: any("DERP cluster serving" in line for line in self.output) or self.exited(),
                       timeout=60, what="cluster up to start")
            if self.exited():
                raise AssertionError("cluster up exited early:\n" + self.log())
        return self

    def _drain_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log(self) -> str:
        return "\n".join(self.output[-200:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the cluster to exit on its own (after a signal the test sent)."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def supervisor_state(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "supervisor.json").read_text())

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.supervisor_state()["workers"]]

    def varz(self, index: int = 0) -> dict[str, Any]:
        return json.loads(fetch_unix(self.run_dir / f"worker-{index}.sock", "/debug/varz"))

    def all_varz(self) -> list[dict[str, Any]]:
        return [self.varz(i) for i in range(self.workers)]

    def total(self, field: str) -> int:
        return sum(doc["worker"][field] for doc in self.all_varz())

    def drops(self, reason: str) -> int:
        return sum(doc["worker"]["drops"].get(reason, 0) for doc in self.all_varz())

    def __enter__(self) -> ClusterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.tmp.cleanup()


@contextlib.contextmanager
def running_cluster(*args: str, **kwargs: Any) -> Iterator[ClusterProcess]:
    with ClusterProcess(*args, **kwargs) as cluster:
        yield cluster


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RawConn:
    """A handshaken DERP connection on a plain non-blocking socket that reads only when told to."""

    def __init__(self, sock: socket.socket, parser: F.FrameParser, frames: list[tuple[int, bytes]]) -> None:
        self.sock = sock
        self.parser = parser
        self.frames = frames

    @classmethod
    async def open(cls, port: int, *, key: PrivateKey | None = None, mesh_key: str = "",
                   rcvbuf: int = 4096) -> RawConn:
        loop = asyncio.get_running_loop()
        key = key or PrivateKey.generate()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
                                      b"Derp-Fast-Start: 1\r\n\r\n")
        parser = F.FrameParser(F.MAX_INFO_LEN)
        frames: list[tuple[int, bytes]] = []
        while not frames:
            frames += parser.feed(await loop.sock_recv(sock, 4096))
        assert frames[0][0] == F.SERVER_KEY
        server_public = F.parse_server_key(frames.pop(0)[1])
        await loop.sock_sendall(sock, seal_client_info(key, server_public, ClientInfo(mesh_key=mesh_key)))
        while not frames:
            data = await loop.sock_recv(sock, 4096)
            assert data, "server closed during the handshake"
            frames += parser.feed(data)
        assert frames.pop(0)[0] == F.SERVER_INFO
        parser.max_frame_len = F.MAX_FRAME_LEN
        conn = cls(sock, parser, frames)
        conn.public = key.public().raw
        return conn

    public: bytes = b""

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def read_until(self, done: object, timeout: float) -> list[tuple[int, bytes]]:
        """Read frames until done(frames) is true, the server closes, or timeout passes."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while not done(self.frames) and time.monotonic() < deadline:  # type: ignore[operator]
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), deadline - time.monotonic())
            except (TimeoutError, OSError):
                break
            if not data:
                break
            self.frames += self.parser.feed(data)
        return self.frames

    def close(self) -> None:
        self.sock.close()
