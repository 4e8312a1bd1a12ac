"""Where a relayed packet's CPU goes, in our worker and in derper, under Tailscale's own client.

The load is bench/derp_compare.py's: tests/interop's `derpload` (derp/derphttp, every frame its own
write), server pinned to one core, load to another. Each probe gets its own load run so that one
probe's overhead does not colour another's figures, and the runs alternate ours / derper:

- `cpu`: utime and stime of the server's processes over the measured window (/proc/PID/stat);
- `syscalls`: `perf stat` counts of the syscall tracepoints over the window, per relayed packet;
- `sizes`: `perf record` of read/write syscall exits for a short window: bytes per call, hence
  frames per read and per write (how much the kernel already batches for us);
- `perf`: `perf record -g` of the server (user and kernel) summarised by DSO and by symbol;
- `pyspy`: `py-spy record --native` of our worker (raw stacks, summarised by bench/pyspy_layers.py).

"Packets" are the packets the load received in the window: each crossed the server once (one
SendPacket read from a sender, one RecvPacket written to a receiver). Tracing slows the server, so
the counts are per packet, not per second. Everything lands in --out as text and one summary.json.

    .venv/bin/python bench/profile_hot_path.py --transport plain --server-cpus 0 --load-cpus 1 \
        --out bench/results/profile-plain

Needs perf (linux-perf), py-spy (`.venv/bin/pip install py-spy`) and the interop binaries.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from derp_compare import Derper, Ours, Server, tls_material
from pyspy_layers import summarise_raw

from derptools.bench.procfs import CLOCK_TICKS
from tests.interop.harness import BIN, build_binaries

SYSCALLS = ["read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg", "epoll_wait",
            "epoll_pwait", "epoll_ctl", "futex", "nanosleep", "sched_yield", "getpid", "tgkill", "rt_sigreturn",
            "setsockopt", "getsockopt", "clock_nanosleep", "madvise", "mmap", "munmap"]
SIZE_EVENTS = ["syscalls:sys_exit_read", "syscalls:sys_exit_write", "syscalls:sys_exit_writev"]
#: a read or write this small is a wake-up (eventfd, pipe) or a control frame, not a relayed packet
SMALL_IO_BYTES = 64


def packets_sent(url: str, cafile: Path | None) -> int:
    """derp_packets_sent from the server's /debug/varz (both publish derper's name; loopback only)."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("derp_packets_sent "):
            return int(float(line.split()[1]))
    raise SystemExit(f"{url}: no derp_packets_sent")


def utime_stime(pid: int) -> tuple[float, float]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


class Probe(Protocol):
    def start(self, pids: list[int]) -> None: ...
    def stop(self) -> dict[str, Any]: ...


class CpuSplit:
    def start(self, pids: list[int]) -> None:
        self.pids = pids
        self.before = [utime_stime(pid) for pid in pids]

    def stop(self) -> dict[str, Any]:
        after = [utime_stime(pid) for pid in self.pids]
        user = sum(a[0] - b[0] for a, b in zip(after, self.before, strict=True))
        system = sum(a[1] - b[1] for a, b in zip(after, self.before, strict=True))
        return {"utime_seconds": user, "stime_seconds": system}


class PerfCommand:
    """A perf subcommand attached to the pids for the measured window, stopped with SIGINT."""

    def __init__(self, argv: list[str], counter: Callable[[], int]) -> None:
        self.argv = argv
        self.counter = counter

    def start(self, pids: list[int]) -> None:
        # perf takes a while to attach its tracepoints: start it disabled and enable it through its
        # control fifo, so its window is exactly [enable ack, disable ack] and the server's own
        # packet counter can be read at those two moments
        fifo_dir = Path(tempfile.mkdtemp(prefix="perf-ctl-"))
        ctl, ack = fifo_dir / "ctl", fifo_dir / "ack"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        self.proc = subprocess.Popen([*self.argv, "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-p",
                                      ",".join(map(str, pids))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.ctl = os.open(ctl, os.O_WRONLY)
        self.ack = os.open(ack, os.O_RDONLY)
        shutil.rmtree(fifo_dir)
        self._command("enable")
        self.packets_before = self.counter()

    def _command(self, command: str) -> None:
        os.write(self.ctl, f"{command}\n".encode())
        reply = os.read(self.ack, 16)
        if not reply.startswith(b"ack"):
            raise SystemExit(f"perf did not acknowledge {command!r}: {reply!r}")

    def finish(self) -> None:
        self.packets = self.counter() - self.packets_before
        self._command("disable")
        os.close(self.ctl)
        os.close(self.ack)
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=120)
        if self.proc.returncode not in (0, -signal.SIGINT):
            raise SystemExit(f"{' '.join(self.argv)} failed: {err[-500:]}")


class SyscallCounts(PerfCommand):
    def __init__(self, out: Path, counter: Callable[[], int]) -> None:
        self.out = out
        events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
        super().__init__(["perf", "stat", "-x", ",", "-o", str(out), "-e", f"raw_syscalls:sys_enter,{events}"], counter)

    def stop(self) -> dict[str, Any]:
        self.finish()
        counts: dict[str, int] = {}
        for line in self.out.read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[0].isdigit():
                counts[parts[2].removeprefix("syscalls:sys_enter_").removeprefix("raw_syscalls:sys_enter")
                       or "all"] = int(parts[0])
        return {"syscalls": counts, "window_packets": self.packets}


class IoSizes(PerfCommand):
    def __init__(self, out: Path, counter: Callable[[], int]) -> None:
        self.out = out
        super().__init__(["perf", "record", "-q", "-o", str(out), "-e", ",".join(SIZE_EVENTS)], counter)

    def stop(self) -> dict[str, Any]:
        self.finish()
        script = subprocess.run(["perf", "script", "-i", str(self.out), "-F", "event,trace"], capture_output=True,
                                text=True, check=True).stdout
        by_call: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        byte_totals: collections.Counter[str] = collections.Counter()
        for line in script.splitlines():
            if "sys_exit_" not in line or "0x" not in line:
                continue
            call = line.split("sys_exit_", 1)[1].split(":", 1)[0]
            ret = int(line.rsplit("0x", 1)[1].strip(), 16)
            ret = ret - (1 << 64) if ret >= 1 << 63 else ret
            if ret < 0:
                by_call[call]["error"] += 1
            elif ret == 0:
                by_call[call]["zero"] += 1
            elif ret <= SMALL_IO_BYTES:
                by_call[call]["small"] += 1
            else:
                by_call[call]["data"] += 1
                byte_totals[call] += ret
        self.out.unlink()
        return {"io_calls": {call: dict(counter) for call, counter in by_call.items()},
                "io_data_bytes": dict(byte_totals), "window_packets": self.packets}


class PerfProfile(PerfCommand):
    def __init__(self, out: Path, counter: Callable[[], int]) -> None:
        self.out = out
        super().__init__(["perf", "record", "-q", "-F", "499", "-g", "-o", str(out)], counter)

    def stop(self) -> dict[str, Any]:
        self.finish()
        for sort, name in (("dso", "dso"), ("dso,sym", "sym")):
            report = subprocess.run(["perf", "report", "-i", str(self.out), "--stdio", "--no-children",
                                     "--sort", sort, "-g", "none", "--percent-limit", "0.5"],
                                    capture_output=True, text=True, check=True).stdout
            self.out.with_suffix(f".{name}.txt").write_text(report)
        self.out.unlink()
        return {"perf_report": str(self.out.with_suffix(".sym.txt")), "window_packets": self.packets}


class PySpy:
    def __init__(self, out: Path, seconds: int, rate: int) -> None:
        self.out, self.seconds, self.rate = out, seconds, rate

    def start(self, pids: list[int]) -> None:
        # the worker is the last pid (ours: supervisor first); py-spy stops itself after --duration
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--native", "-r",
                                      str(self.rate), "-d", str(self.seconds), "-p", str(pids[-1]), "-f", "raw",
                                      "-o", str(self.out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)

    def stop(self) -> dict[str, Any]:
        _, err = self.proc.communicate(timeout=self.seconds + 60)
        if self.proc.returncode != 0:
            raise SystemExit(f"py-spy failed: {err[-500:]}")
        summary = summarise_raw(self.out)
        self.out.with_suffix(".layers.json").write_text(json.dumps(summary, indent=2))
        return {"pyspy_layers": summary["layers"], "pyspy_samples": summary["samples"]}


def run_load(server: Server, args: argparse.Namespace, probe: Probe, seconds: float, bins: Path,
             env: dict[str, str]) -> dict[str, Any]:
    cmd = ["taskset", "-c", args.load_cpus, str(bins / "derpload"), "-url", server.url, "-pairs", str(args.pairs),
           "-size", str(args.size), "-window", str(args.window), "-seconds", str(seconds), "-warmup", "1"]
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert load.stderr is not None and load.stdout is not None
    measured: dict[str, Any] = {}
    errors: list[str] = []
    for line in load.stderr:
        if line.strip() == "measuring":
            probe.start(server.pids())
        elif line.strip() == "measured":
            measured = probe.stop()
        else:
            errors.append(line)
    out = load.stdout.read()
    if load.wait(120) != 0 or not measured:
        raise SystemExit(f"derpload against {server.name} failed: {''.join(errors).strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return {**result, **measured}


def per_packet(doc: dict[str, Any]) -> dict[str, Any]:
    """The counts of one probe run divided by the packets relayed in its window."""
    # perf's window is its own (enable..disable), counted by the server's derp_packets_sent
    packets = doc["window_packets"] if "window_packets" in doc else doc["packets"]
    derived: dict[str, Any] = {}
    if "utime_seconds" in doc:
        total = doc["utime_seconds"] + doc["stime_seconds"]
        derived["cpu_us_per_packet"] = total / packets * 1e6
        derived["kernel_share"] = doc["stime_seconds"] / total if total else float("nan")
    if "syscalls" in doc:
        derived["syscalls_per_packet"] = {name: count / packets for name, count in doc["syscalls"].items() if count}
    if "io_calls" in doc:
        # frames are 5 (header) + 32 (key) + size bytes on both sides: SendPacket in, RecvPacket out
        frame = 5 + 32 + doc.get("size", 0)
        derived["frames_per_data_call"] = {call: doc["io_data_bytes"].get(call, 0) / frame / max(1, c.get("data", 0))
                                           for call, c in doc["io_calls"].items()}
    return derived


def table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows, one per server: per-packet CPU and its kernel share (each cpu run), syscalls and
    frames per read/write."""
    rows = ["| server | pkt/s (cpu runs) | CPU us/pkt | kernel share | syscalls/pkt | read | write | epoll_pwait "
            "| futex+nanosleep | frames/read | frames/write |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in summary["results"].items():
        cpu = [run for key, run in runs.items() if key.startswith("cpu")]
        calls = runs.get("syscalls", {}).get("syscalls_per_packet", {})
        frames = runs.get("sizes", {}).get("frames_per_data_call", {})
        rates = " / ".join(f"{run['packets_per_second']:,.0f}" for run in cpu)
        costs = " / ".join(f"{run['cpu_us_per_packet']:.2f}" for run in cpu)
        kernel = " / ".join(f"{run['kernel_share']:.0%}" for run in cpu)
        rows.append(
            f"| {name} | {rates} | {costs} | {kernel} "
            f"| {calls.get('all', 0):.3f} | {calls.get('read', 0):.3f} "
            f"| {calls.get('write', 0) + calls.get('writev', 0):.3f} | {calls.get('epoll_pwait', 0):.3f} "
            f"| {calls.get('futex', 0) + calls.get('nanosleep', 0):.3f} "
            f"| {frames.get('read', 0):.1f} | {max(frames.get('write', 0), frames.get('writev', 0)):.1f} |")
    return rows


PROBES = ("cpu", "syscalls", "sizes", "perf", "pyspy")


def make_probe(name: str, args: argparse.Namespace, out: Path, varz: str, cafile: Path | None) -> Probe:
    def counter() -> int:
        return packets_sent(varz, cafile)

    if name == "cpu":
        return CpuSplit()
    if name == "syscalls":
        return SyscallCounts(out.with_suffix(".txt"), counter)
    if name == "sizes":
        return IoSizes(out.with_suffix(".data"), counter)
    if name == "perf":
        return PerfProfile(out.with_suffix(".data"), counter)
    return PySpy(out.with_suffix(".txt"), args.pyspy_seconds, args.pyspy_rate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=["plain", "tls"], default="plain")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--size", type=int, default=1200)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window of the cpu/syscalls/perf runs")
    parser.add_argument("--sizes-seconds", type=float, default=2.0, help="window of the sizes run (many events)")
    parser.add_argument("--pyspy-seconds", type=int, default=20)
    parser.add_argument("--pyspy-rate", type=int, default=200)
    parser.add_argument("--probes", default="cpu,syscalls,sizes,perf,pyspy,cpu",
                        help="comma-separated, run in this order (a probe may repeat)")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", action="store_true", help="only print the table of an existing --out")
    args = parser.parse_args()
    if args.table:
        print("\n".join(table(json.loads((args.out / "summary.json").read_text()))))
        return 0
    args.workers = 1  # one worker against derper's GOMAXPROCS=1: the per-core comparison
    bins = BIN if (BIN / "derpload").exists() and (BIN / "derper").exists() else build_binaries()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="derp-profile-"))
    results: dict[str, dict[str, Any]] = {"ours": {}, "derper": {}}
    try:
        with tls_material(work, args.transport != "plain") as (certdir, tls_env):
            env = dict(os.environ, TS_NO_LOGS_NO_SUPPORT="true", **tls_env)
            servers: list[Server] = [Ours(work, args, certdir), Derper(work, args, bins, certdir)]
            try:
                for index, name in enumerate(args.probes.split(",")):
                    for server in servers if index % 2 == 0 else list(reversed(servers)):
                        seconds = {"sizes": args.sizes_seconds, "pyspy": args.pyspy_seconds + 1}.get(
                            name, args.seconds)
                        if name not in PROBES:
                            raise SystemExit(f"--probes: unknown probe {name!r} ({', '.join(PROBES)})")
                        if name == "pyspy" and server.name != "ours":
                            continue  # py-spy profiles Python; derper's profile is the perf probe's
                        cafile = work / "ca.pem" if certdir else None
                        probe = make_probe(name, args, args.out / f"{server.name}-{name}-{index}",
                                           server.url.removesuffix("/derp") + "/debug/varz", cafile)
                        doc = run_load(server, args, probe, seconds, bins, env)
                        doc["size"] = args.size
                        doc.update(per_packet(doc))
                        key = name if name not in results[server.name] else f"{name}-{index}"
                        results[server.name][key] = doc
                        print(f"{name:8s} {server.name:6s} {doc['packets_per_second']:9.0f} pkt/s "
                              + json.dumps({k: v for k, v in doc.items() if k in (
                                  "cpu_us_per_packet", "kernel_share", "frames_per_data_call")}), flush=True)
            finally:
                for server in servers:
                    server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"transport": args.transport, "pairs": args.pairs, "size": args.size, "window": args.window,
               "server_cpus": args.server_cpus, "load_cpus": args.load_cpus, "results": results}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n".join(table(summary)))
    print(f"wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
