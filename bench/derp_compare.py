"""Our node against a stock derper under the same load from Tailscale's own DERP client.

The load is tests/interop's `derpload` (tailscale.com/derp/derphttp, every frame its own write, as
real clients send them), built from the interop tier's Go module. Each round runs the identical load
against our `cluster up` and against `derper` from the same module, alternating, and charges each
server the utime+stime of its own processes over the measured window (kernel time in those
processes included). Medians over the rounds and the ratios ours/derper are printed, and written
as JSON with --json.

    .venv/bin/python bench/derp_compare.py --transport plain --workers 1 --server-cpus 0 --load-cpus 1
    .venv/bin/python bench/derp_compare.py --transport tls --pairs 20 --size 100 --rounds 5

Needs Go (the first run builds Tailscale's programs: minutes on a cold Go cache). Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derptools.bench.procfs import cpu_seconds
from tests.interop.harness import WS_BIN, build_binaries
from tests.support import free_port, wait_until

HOSTNAME = "localhost"


def wait_listening(port: int, what: str) -> None:
    code = "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()"
    wait_until(lambda: subprocess.run([sys.executable, "-c", code, str(port)], capture_output=True).returncode == 0,
               timeout=60, what=what)


def taskset(cpus: str) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


class Server:
    name = ""
    url = ""

    def pids(self) -> list[int]:
        raise NotImplementedError

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())


class Ours(Server):
    name = "ours"

    def __init__(self, work: Path, args: argparse.Namespace, certdir: Path | None) -> None:
        self.port = free_port()
        self.run_dir = work / "ours-run"
        cmd = [*taskset(args.server_cpus), sys.executable, "-m", "cluster", "up", "--workers", str(args.workers),
               "--listen", f"127.0.0.1:{self.port}", "--no-stun", "--state-dir", str(work / "ours-state"),
               "--run-dir", str(self.run_dir), "--log-level", "warning"]
        if certdir is not None:
            cmd += ["--certmode", "manual", "--hostname", HOSTNAME, "--certdir", str(certdir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        scheme = "https" if certdir else "http"
        self.url = f"{scheme}://{HOSTNAME}:{self.port}/derp"
        wait_until(lambda: len(self._workers()) == args.workers, timeout=60, what="cluster up's workers")
        wait_listening(self.port, "cluster up to listen")

    def _workers(self) -> list[int]:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            doc = json.loads((self.run_dir / "supervisor.json").read_text())
            return [int(w["pid"]) for w in doc["workers"] if w.get("pid")]
        return []

    def pids(self) -> list[int]:
        return [self.proc.pid, *self._workers()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Derper(Server):
    name = "derper"

    def __init__(self, work: Path, args: argparse.Namespace, bins: Path, certdir: Path | None) -> None:
        self.port = free_port()
        cmd = [*taskset(args.server_cpus), str(bins / "derper"), "-a", f"127.0.0.1:{self.port}", "-stun=false",
               "-http-port", "-1", "-c", str(work / "derper.json")]
        if certdir is not None:
            cmd += ["-certmode", "manual", "-certdir", str(certdir), "-hostname", HOSTNAME]
        env = dict(os.environ, GOMAXPROCS=str(args.workers), TS_NO_LOGS_NO_SUPPORT="true")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        scheme = "https" if certdir else "http"
        self.url = f"{scheme}://{HOSTNAME}:{self.port}/derp"
        wait_listening(self.port, "derper to listen")

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_load(server: Server, args: argparse.Namespace, bins: Path, env: dict[str, str]) -> dict[str, Any]:
    cmd = [*taskset(args.load_cpus), str(bins / "derpload"), "-url", server.url, "-pairs", str(args.pairs),
           "-size", str(args.size), "-window", str(args.window), "-seconds", str(args.seconds),
           "-warmup", str(args.warmup)]
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert load.stderr is not None and load.stdout is not None
    # derpload marks the measured window on stderr: CPU is sampled at exactly those two moments
    marks: dict[str, float] = {}
    errors: list[str] = []
    for line in load.stderr:
        if line.strip() in ("measuring", "measured"):
            marks[line.strip()] = server.cpu()
        else:
            errors.append(line)
    out = load.stdout.read()
    if load.wait(60) != 0 or len(marks) != 2:
        raise SystemExit(f"derpload against {server.name} failed: {''.join(errors).strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    cpu = marks["measured"] - marks["measuring"]
    result["server_cpu_seconds"] = cpu
    result["server_us_per_packet"] = cpu / result["packets"] * 1e6 if result["packets"] else float("nan")
    return result


@contextlib.contextmanager
def tls_material(work: Path, enabled: bool) -> Iterator[tuple[Path | None, dict[str, str]]]:
    if not enabled:
        yield None, {}
        return
    import trustme

    ca = trustme.CA()
    certdir = work / "certs"
    certdir.mkdir()
    cert = ca.issue_cert(HOSTNAME)
    cert.private_key_pem.write_to_path(certdir / f"{HOSTNAME}.key")
    (certdir / f"{HOSTNAME}.crt").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(work / "ca.pem")
    yield certdir, {"SSL_CERT_FILE": str(work / "ca.pem")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=["plain", "tls", "websocket"], default="plain")
    parser.add_argument("--workers", type=int, default=1, help="our workers, and derper's GOMAXPROCS")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--size", type=int, default=1200)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-cpus", default="", help="taskset list for both servers, e.g. 0")
    parser.add_argument("--load-cpus", default="", help="taskset list for the load generator, e.g. 1")
    parser.add_argument("--json", type=Path, help="also write the rounds and medians here")
    args = parser.parse_args()
    bins = build_binaries()
    load_bins = WS_BIN if args.transport == "websocket" else bins
    work = Path(tempfile.mkdtemp(prefix="derp-compare-"))
    rounds: dict[str, list[dict[str, Any]]] = {"ours": [], "derper": []}
    try:
        with tls_material(work, args.transport != "plain") as (certdir, tls_env):
            env = dict(os.environ, TS_NO_LOGS_NO_SUPPORT="true", **tls_env)
            if args.transport == "websocket":
                env["TS_DEBUG_DERP_WS_CLIENT"] = "1"
            servers: list[Server] = [Ours(work, args, certdir), Derper(work, args, bins, certdir)]
            try:
                for index in range(args.rounds):
                    for server in servers if index % 2 == 0 else reversed(servers):
                        result = run_load(server, args, load_bins, env)
                        rounds[server.name].append(result)
                        print(f"round {index + 1} {server.name:6s} {result['packets_per_second']:10.0f} pkt/s "
                              f"{result['server_us_per_packet']:6.2f} us/pkt stalls {result['stalls']}", flush=True)
            finally:
                for server in servers:
                    server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: {"packets_per_second": statistics.median(r["packets_per_second"] for r in results),
                      "server_us_per_packet": statistics.median(r["server_us_per_packet"] for r in results)}
               for name, results in rounds.items()}
    ratio_pps = medians["ours"]["packets_per_second"] / medians["derper"]["packets_per_second"]
    ratio_cpu = medians["ours"]["server_us_per_packet"] / medians["derper"]["server_us_per_packet"]
    print(f"{args.transport} workers={args.workers} pairs={args.pairs} size={args.size} window={args.window}: "
          f"ours {medians['ours']['packets_per_second']:.0f} pkt/s {medians['ours']['server_us_per_packet']:.2f} us, "
          f"derper {medians['derper']['packets_per_second']:.0f} pkt/s "
          f"{medians['derper']['server_us_per_packet']:.2f} us; "
          f"ours/derper packets/s {ratio_pps:.2f}x, CPU/packet {ratio_cpu:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
                                         "medians": medians, "ratio_pps": ratio_pps, "ratio_cpu": ratio_cpu},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
