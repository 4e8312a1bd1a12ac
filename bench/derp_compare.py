"""Our node against a stock derper under the same load from Tailscale's own DERP client.

The load is tests/interop's `derpload` (tailscale.com/derp/derphttp, every frame its own write, as
real clients send them), built from the interop tier's Go module. Each round runs the identical load
against our `cluster up` and against `derper` from the same module, alternating, and charges each
server the utime+stime of its own processes over the measured window (kernel time in those
processes included). Medians over the rounds and the ratios ours/derper are printed, and written
as JSON with --json. bench/derp_table.py runs compare() over the whole matrix.

Placement (--placement, our node with 2+ workers). The workers share the port through
SO_REUSEPORT, so the kernel picks a worker per connection. derpload -pin connects one client at a
time and waits for "keep" or "retry"; this script reads every worker's `accepts` counter (its
/debug/varz on the admin socket in the run dir) after each connect, and keeps the client only on
a worker that fits: `same` puts each pair's two clients on one worker, `cross` on two, pairs
spread evenly over the workers either way (cluster bench's pin_pairs method). `random` takes what
the kernel gives. derper is one process: it always runs unpinned ("one process" in the results).
The workers' packets_forwarded_out over the window shows how many packets crossed between them.

Connections (--mode connections): `derpconns` (derphttp as well) holds --clients idle clients on
a fresh server, RSS per client = (RSS of the server's processes with them - before) / clients,
then loops connect + close (--concurrency at once) for handshakes/s and server CPU per handshake.
The Python generator of `cluster bench idle|connect` speaks plain HTTP only, hence Go for TLS.

Latency: each packet carries its send time; derpload reports one-way p50/p90/p99 of the packets
received in the window, at saturation (closed loop, --window in flight per pair).

    .venv/bin/python bench/derp_compare.py --transport plain --workers 1 --server-cpus 0 --load-cpus 1
    .venv/bin/python bench/derp_compare.py --transport tls --pairs 20 --size 100 --rounds 5
    .venv/bin/python bench/derp_compare.py --workers 2 --placement cross --pairs 20
    .venv/bin/python bench/derp_compare.py --mode connections --transport tls --clients 10000

Needs Go (the first run builds Tailscale's programs: minutes on a cold Go cache). Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derptools.bench.procfs import ClusterInfo, cpu_seconds, rss_kib
from derptools.bench.runner import Target
from tests.interop.harness import WS_BIN, build_binaries
from tests.support import free_port, wait_until

HOSTNAME = "localhost"
#: one `go build` per process, however many comparisons it runs (a no-op build still takes seconds)
binaries = functools.cache(build_binaries)


def wait_listening(port: int, what: str) -> None:
    code = "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()"
    wait_until(lambda: subprocess.run([sys.executable, "-c", code, str(port)], capture_output=True).returncode == 0,
               timeout=60, what=what)


def taskset(cpus: str) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller (this machine has no v2 one)
QUOTA_PERIOD_US = 10_000  # a short period, so a capped server is throttled in small slices


class CpuCap:
    """A server capped at `quota` of one CPU (CFS bandwidth, inherited by its workers and threads):
    then the server, not the load generator, is the bottleneck, and packets/s is its capacity at
    that CPU. A command is started inside the group by a shell that joins it and execs."""

    def __init__(self, quota: float, name: str) -> None:
        self.group: Path | None = None
        if quota <= 0:
            return
        if not (CPU_CGROUPS / "cpu.cfs_quota_us").exists():
            raise SystemExit(f"--server-quota needs cgroup v1's cpu controller at {CPU_CGROUPS}")
        self.group = CPU_CGROUPS / f"derp-bench-{name}-{os.getpid()}"
        self.group.mkdir(exist_ok=True)
        (self.group / "cpu.cfs_period_us").write_text(str(QUOTA_PERIOD_US))
        (self.group / "cpu.cfs_quota_us").write_text(str(int(quota * QUOTA_PERIOD_US)))

    def wrap(self, cmd: list[str]) -> list[str]:
        if self.group is None:
            return cmd
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.group), *cmd]

    def remove(self) -> None:
        if self.group is not None:
            with contextlib.suppress(OSError):
                self.group.rmdir()


class Server:
    name = ""
    url = ""

    def pids(self) -> list[int]:
        raise NotImplementedError

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def counters(self) -> dict[str, int] | None:
        """The server's own packet counters summed over its processes, where it exposes them."""
        return None


class Ours(Server):
    name = "ours"

    def __init__(self, work: Path, args: Any, certdir: Path | None) -> None:
        self.port = free_port()
        self.workers = args.workers
        self.run_dir = work / "ours-run"
        self.cap = CpuCap(getattr(args, "server_quota", 0.0), "ours")
        cmd = [*taskset(args.server_cpus), sys.executable, "-m", "cluster", "up", "--workers", str(args.workers),
               "--listen", f"127.0.0.1:{self.port}", "--no-stun", "--state-dir", str(work / "ours-state"),
               "--run-dir", str(self.run_dir), "--log-level", "warning"]
        if certdir is not None:
            cmd += ["--certmode", "manual", "--hostname", HOSTNAME, "--certdir", str(certdir)]
        self.proc = subprocess.Popen(self.cap.wrap(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        scheme = "https" if certdir else "http"
        self.url = f"{scheme}://{HOSTNAME}:{self.port}/derp"
        wait_until(lambda: len(self._workers()) == args.workers, timeout=60, what="cluster up's workers")
        wait_listening(self.port, "cluster up to listen")
        # placement reads every worker's counters through its admin socket: wait until all answer
        wait_until(self._admin_ready, timeout=60, what="every worker's admin socket")

    def _admin_ready(self) -> bool:
        try:
            self.cluster().accepts()
        except OSError:
            return False
        return True

    def _workers(self) -> list[int]:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            doc = json.loads((self.run_dir / "supervisor.json").read_text())
            return [int(w["pid"]) for w in doc["workers"] if w.get("pid")]
        return []

    def pids(self) -> list[int]:
        return [self.proc.pid, *self._workers()]

    def cluster(self) -> ClusterInfo:
        return ClusterInfo.load(self.run_dir)

    def counters(self) -> dict[str, int] | None:
        return Target(self.name, self.url, self._workers(), self.cluster()).varz_totals()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.cap.remove()


class Derper(Server):
    name = "derper"

    def __init__(self, work: Path, args: Any, bins: Path, certdir: Path | None) -> None:
        self.port = free_port()
        self.cap = CpuCap(getattr(args, "server_quota", 0.0), "derper")
        cmd = [*taskset(args.server_cpus), str(bins / "derper"), "-a", f"127.0.0.1:{self.port}", "-stun=false",
               "-http-port", "-1", "-c", str(work / "derper.json")]
        if certdir is not None:
            cmd += ["-certmode", "manual", "-certdir", str(certdir), "-hostname", HOSTNAME]
        env = dict(os.environ, GOMAXPROCS=str(args.workers), TS_NO_LOGS_NO_SUPPORT="true")
        self.proc = subprocess.Popen(self.cap.wrap(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        scheme = "https" if certdir else "http"
        self.url = f"{scheme}://{HOSTNAME}:{self.port}/derp"
        wait_listening(self.port, "derper to listen")

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.cap.remove()


PLACEMENTS = ("random", "same", "cross")


class Placer:
    """Answers derpload -pin: keep a client or retry it, by which worker's accept counter grew.

    Clients arrive in order sender 0, receiver 0, sender 1, ... A sender is kept on any worker
    still holding fewer than its share of senders (pairs spread evenly over the workers); its
    receiver is kept on the sender's worker (`same`) or on any other (`cross`). A reading where
    not exactly one counter grew by exactly one (something else connected) is retried too.
    """

    def __init__(self, cluster: ClusterInfo, placement: str, pairs: int) -> None:
        if placement == "cross" and len(cluster.worker_indexes) < 2:
            raise SystemExit("derp_compare: placement cross needs at least 2 workers")
        self.cluster = cluster
        self.placement = placement
        self.share = -(-pairs // len(cluster.worker_indexes))
        self.limit = 50 * 2 * pairs + 20
        self.before = cluster.accepts()
        self.senders: dict[int, int] = dict.fromkeys(cluster.worker_indexes, 0)
        self.sender_worker = -1
        self.layout: list[tuple[int, int]] = []  # each pair's (sender worker, receiver worker)
        self.connects = 0

    def keep(self, index: int) -> bool:
        self.connects += 1
        if self.connects > self.limit:
            raise SystemExit(f"derp_compare: could not place the clients after {self.connects} connects "
                             "(is the kernel sending every connection to one worker?)")
        after = self.cluster.accepts()
        grown = {w: after[w] - self.before.get(w, 0) for w in after if after[w] != self.before.get(w, 0)}
        self.before = after
        if len(grown) != 1 or next(iter(grown.values())) != 1:
            return False
        (worker,) = grown
        if index % 2 == 0:
            if self.senders[worker] >= self.share:
                return False
            self.senders[worker] += 1
            self.sender_worker = worker
            return True
        if (worker == self.sender_worker) != (self.placement == "same"):
            return False
        self.layout.append((self.sender_worker, worker))
        return True


def pinned(server: Server, placement: str) -> bool:
    """Whether this run places the clients: only our node, only with more than one worker."""
    return isinstance(server, Ours) and placement != "random" and server.workers > 1


def run_load(server: Server, args: Any, bins: Path, env: dict[str, str], placement: str = "random",
             rate: float = 0.0) -> dict[str, Any]:
    """One derpload run against one server; args has derp_compare's load fields (pairs, size, ...).
    rate > 0 paces the senders at that many packets/s in all (latency below saturation)."""
    cmd = [*taskset(args.load_cpus), str(bins / "derpload"), "-url", server.url, "-pairs", str(args.pairs),
           "-size", str(args.size), "-window", str(args.window), "-seconds", str(args.seconds),
           "-warmup", str(args.warmup), "-rate", str(rate)]
    placer = Placer(server.cluster(), placement, args.pairs) if pinned(server, placement) else None
    cmd += ["-hold", *(["-pin"] if placer is not None else [])]
    load = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert load.stdin is not None and load.stderr is not None and load.stdout is not None
    # derpload marks the measured window on stderr: CPU and counters are sampled at exactly those moments
    marks: dict[str, float] = {}
    varz: dict[str, dict[str, int] | None] = {}
    errors: list[str] = []
    try:
        for line in load.stderr:
            word, _, rest = line.strip().partition(" ")
            if word in ("measuring", "measured"):
                marks[word] = server.cpu()
                varz[word] = server.counters()
                if word == "measured":
                    load.stdin.close()  # derpload -hold: now it may close its clients
            elif word == "connected" and placer is not None:
                load.stdin.write("keep\n" if placer.keep(int(rest)) else "retry\n")
                load.stdin.flush()
            else:
                errors.append(line)
    finally:
        if load.poll() is None and len(marks) != 2:
            load.kill()
    out = load.stdout.read()
    if load.wait(60) != 0 or len(marks) != 2:
        raise SystemExit(f"derpload against {server.name} failed: {''.join(errors).strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    cpu = marks["measured"] - marks["measuring"]
    result["server_cpu_seconds"] = cpu
    result["server_us_per_packet"] = cpu / result["packets"] * 1e6 if result["packets"] else float("nan")
    result["placement"] = placement if isinstance(server, Ours) else "one process"
    result["pair_workers"] = placer.layout if placer is not None else []
    result["connects"] = placer.connects if placer is not None else 2 * args.pairs
    before, after = varz["measuring"], varz["measured"]
    result["server_counters"] = ({name: after[name] - before.get(name, 0) for name in after}
                                 if before is not None and after is not None else None)
    return result


def raise_nofile_limit() -> None:
    """Soft open-files limit up to the hard one: 10k idle clients need 10k descriptors on each side."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib_of(server: Server) -> int:
    return sum(rss_kib(pid) for pid in server.pids())


def run_idle(server: Server, bins: Path, env: dict[str, str], *, clients: int, concurrency: int,
             load_cpus: str = "", settle: float = 1.0) -> dict[str, Any]:
    """Hold `clients` idle derphttp clients on the server; RSS per client = growth / clients."""
    before = rss_kib_of(server)
    cmd = [*taskset(load_cpus), str(bins / "derpconns"), "-mode", "idle", "-url", server.url,
           "-clients", str(clients), "-concurrency", str(concurrency)]
    load = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert load.stdin is not None and load.stdout is not None and load.stderr is not None
    line = load.stdout.readline()
    if not line:
        load.kill()
        raise SystemExit(f"derpconns idle against {server.name} failed: {load.stderr.read().strip()[-500:]}")
    result: dict[str, Any] = json.loads(line)
    time.sleep(settle)  # let the server finish what each handshake left behind before reading RSS
    after = rss_kib_of(server)
    load.stdin.close()
    load.wait(60)
    result.update(server=server.name, rss_before_kib=before, rss_after_kib=after,
                  rss_per_client_kib=(after - before) / result["clients"] if result["clients"] else float("nan"))
    return result


def run_handshakes(server: Server, bins: Path, env: dict[str, str], *, concurrency: int, seconds: float,
                   warmup: float, load_cpus: str = "") -> dict[str, Any]:
    """Loops of connect + close for `seconds`; the server's CPU is charged over derpconns' window."""
    cmd = [*taskset(load_cpus), str(bins / "derpconns"), "-mode", "handshakes", "-url", server.url,
           "-concurrency", str(concurrency), "-seconds", str(seconds), "-warmup", str(warmup)]
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert load.stdout is not None and load.stderr is not None
    marks: dict[str, float] = {}
    errors: list[str] = []
    for line in load.stderr:
        if line.strip() in ("measuring", "measured"):
            marks[line.strip()] = server.cpu()
        else:
            errors.append(line)
    out = load.stdout.read()
    if load.wait(60) != 0 or len(marks) != 2:
        raise SystemExit(f"derpconns handshakes against {server.name} failed: {''.join(errors).strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    cpu = marks["measured"] - marks["measuring"]
    result["server"] = server.name
    result["server_cpu_seconds"] = cpu
    result["server_us_per_handshake"] = cpu / result["handshakes"] * 1e6 if result["handshakes"] else float("nan")
    return result


def compare_connections(*, transport: str, clients: int, concurrency: int, seconds: float, warmup: float,
                        rounds: int, server_cpus: str = "", load_cpus: str = "",
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Idle RSS per client and handshakes/s, our 1-worker node against derper with GOMAXPROCS=1.

    Idle: each server fresh (a Python process keeps memory it freed), measured once. Handshakes:
    `rounds` alternating runs against one instance of each; medians and ratios ours/derper.
    """
    raise_nofile_limit()
    bins = binaries()
    shape = Shape(transport=transport, workers=1, server_cpus=server_cpus, load_cpus=load_cpus)
    work = Path(tempfile.mkdtemp(prefix="derp-compare-conns-"))
    doc: dict[str, Any] = {"transport": transport, "clients": clients, "concurrency": concurrency,
                           "idle": {}, "handshakes": {"ours": [], "derper": []}}
    try:
        with tls_material(work, transport != "plain") as (certdir, tls_env):
            env = dict(os.environ, TS_NO_LOGS_NO_SUPPORT="true", **tls_env)
            for name in ("ours", "derper"):
                (work / f"idle-{name}").mkdir()
                server = (Ours(work / "idle-ours", shape, certdir) if name == "ours"
                          else Derper(work / "idle-derper", shape, bins, certdir))
                try:
                    idle = run_idle(server, bins, env, clients=clients, concurrency=concurrency, load_cpus=load_cpus)
                finally:
                    server.stop()
                doc["idle"][name] = idle
                log(f"idle   {name:6s} {idle['clients']} clients: {idle['rss_per_client_kib']:.1f} KiB per client "
                    f"(RSS {idle['rss_before_kib']} -> {idle['rss_after_kib']} KiB), "
                    f"{idle['connects_per_second']:.0f} connects/s")
            servers: dict[str, Server] = {"ours": Ours(work, shape, certdir)}
            try:
                servers["derper"] = Derper(work, shape, bins, certdir)
                for index in range(rounds):
                    for name in ("ours", "derper") if index % 2 == 0 else ("derper", "ours"):
                        result = run_handshakes(servers[name], bins, env, concurrency=concurrency, seconds=seconds,
                                                warmup=warmup, load_cpus=load_cpus)
                        doc["handshakes"][name].append(result)
                        log(f"round {index + 1} {name:6s} {result['handshakes_per_second']:8.0f} handshakes/s "
                            f"{result['server_us_per_handshake']:8.0f} us CPU each, failures {result['failures']}")
            finally:
                for server in servers.values():
                    server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: {key: statistics.median(r[key] for r in results)
                      for key in ("handshakes_per_second", "server_us_per_handshake")}
               for name, results in doc["handshakes"].items()}
    doc["handshake_medians"] = medians
    doc["ratio_idle_rss"] = doc["idle"]["ours"]["rss_per_client_kib"] / doc["idle"]["derper"]["rss_per_client_kib"]
    doc["ratio_handshakes"] = medians["ours"]["handshakes_per_second"] / medians["derper"]["handshakes_per_second"]
    doc["ratio_handshake_cpu"] = (medians["ours"]["server_us_per_handshake"]
                                  / medians["derper"]["server_us_per_handshake"])
    return doc


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


@dataclass(frozen=True, slots=True)
class Shape:
    """One load shape and where it runs: what Ours, Derper and run_load read (an argparse
    Namespace with the same fields does as well)."""

    transport: str = "plain"
    workers: int = 1
    pairs: int = 4
    size: int = 1200
    window: int = 32
    seconds: float = 5.0
    warmup: float = 1.0
    server_cpus: str = ""
    load_cpus: str = ""
    server_quota: float = 0.0  # > 0: the server capped at this fraction of one CPU (CpuCap)


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    median: dict[str, Any] = {key: statistics.median(r[key] for r in results)
                              for key in ("packets_per_second", "server_us_per_packet")}
    shares = [r["server_counters"]["packets_forwarded_out"] / r["server_counters"]["packets_received"]
              for r in results if r.get("server_counters") and r["server_counters"].get("packets_received")]
    if shares:  # what fraction of the packets crossed between workers (0 on one worker or `same`)
        median["cross_worker_share"] = statistics.median(shares)
    latencies = [r["latency_us"] for r in results if r.get("latency_us")]
    if latencies:
        median["latency_us"] = {q: statistics.median(lat[q] for lat in latencies) for q in ("p50", "p99")}
    return median


def describe(what: str, name: str, result: dict[str, Any]) -> str:
    latency = result.get("latency_us") or {}
    return (f"{what} {name:6s} {result['placement']:11s} {result['packets_per_second']:10.0f} pkt/s "
            f"{result['server_us_per_packet']:6.2f} us/pkt p50 {latency.get('p50', float('nan')):7.0f} us "
            f"p99 {latency.get('p99', float('nan')):7.0f} us stalls {result['stalls']}")


def compare(shape: Shape, *, rounds: int, placements: Sequence[str] = ("random",), paced_fraction: float = 0.0,
            paced_seconds: float = 2.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the shape against our node once per placement and once against derper, alternating the
    order every round; return the rounds, the medians and the ours/derper ratios.

    The result's "ours" maps each placement to {"rounds", "median", "ratio_pps", "ratio_cpu"};
    "derper" is {"rounds", "median"} (derper is one process: placement does not apply). With
    paced_fraction > 0 each of them also gets "paced": one run of paced_seconds at that fraction of
    its own median packets/s, for the latency of a relay that is not saturated.
    """
    for placement in placements:
        if placement not in PLACEMENTS:
            raise SystemExit(f"derp_compare: placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    bins = binaries()
    load_bins = WS_BIN if shape.transport == "websocket" else bins
    work = Path(tempfile.mkdtemp(prefix="derp-compare-"))
    runs: list[tuple[str, str]] = [*(("ours", p) for p in placements), ("derper", "one process")]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {run: [] for run in runs}
    paced: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        with tls_material(work, shape.transport != "plain") as (certdir, tls_env):
            env = dict(os.environ, TS_NO_LOGS_NO_SUPPORT="true", **tls_env)
            if shape.transport == "websocket":
                env["TS_DEBUG_DERP_WS_CLIENT"] = "1"
            servers: dict[str, Server] = {"ours": Ours(work, shape, certdir)}
            try:
                servers["derper"] = Derper(work, shape, bins, certdir)
                for index in range(rounds):
                    for name, placement in runs if index % 2 == 0 else reversed(runs):
                        result = run_load(servers[name], shape, load_bins, env, placement)
                        results[(name, placement)].append(result)
                        log(describe(f"round {index + 1}", name, result))
                if paced_fraction > 0:
                    paced_shape = replace(shape, seconds=paced_seconds)
                    for name, placement in runs:
                        rate = paced_fraction * _median(results[(name, placement)])["packets_per_second"]
                        result = run_load(servers[name], paced_shape, load_bins, env, placement, rate=rate)
                        paced[(name, placement)] = result
                        log(describe("paced  ", name, result) + f" (paced at {rate:.0f} pkt/s)")
            finally:
                for server in servers.values():
                    server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    derper_rounds = results[("derper", "one process")]
    derper_median = _median(derper_rounds)
    doc: dict[str, Any] = {"shape": asdict(shape), "rounds_run": rounds, "ours": {},
                           "derper": {"rounds": derper_rounds, "median": derper_median,
                                      "paced": paced.get(("derper", "one process"))}}
    for placement in placements:
        ours_rounds = results[("ours", placement)]
        ours_median = _median(ours_rounds)
        doc["ours"][placement] = {
            "rounds": ours_rounds, "median": ours_median, "paced": paced.get(("ours", placement)),
            "ratio_pps": ours_median["packets_per_second"] / derper_median["packets_per_second"],
            "ratio_cpu": ours_median["server_us_per_packet"] / derper_median["server_us_per_packet"],
        }
    return doc


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
    parser.add_argument("--placement", choices=PLACEMENTS, default="random",
                        help="where our node's workers get each pair's two clients: same worker, different "
                        "workers (pairs spread evenly either way), or as the kernel's SO_REUSEPORT hash falls "
                        "(random); needs --workers 2+ to mean anything, derper always runs unpinned")
    parser.add_argument("--paced-fraction", type=float, default=0.0, help="after the rounds, one run per server "
                        "paced at this fraction of its median packets/s (latency below saturation; 0: none)")
    parser.add_argument("--server-cpus", default="", help="taskset list for both servers, e.g. 0")
    parser.add_argument("--load-cpus", default="", help="taskset list for the load generator, e.g. 1")
    parser.add_argument("--server-quota", type=float, default=0.0,
                        help="cap each server at this fraction of one CPU (cgroup CFS quota), so that the "
                             "server, not the load generator, sets the rate: packets/s is then its capacity")
    parser.add_argument("--mode", choices=["relay", "connections"], default="relay",
                        help="relay: packets/s and CPU per packet; connections: idle RSS per client (--clients) "
                        "and handshakes/s (--concurrency loops), one worker against GOMAXPROCS=1")
    parser.add_argument("--clients", type=int, default=10000, help="connections: idle clients to hold")
    parser.add_argument("--concurrency", type=int, default=32, help="connections: handshakes in progress at once")
    parser.add_argument("--json", type=Path, help="also write the rounds and medians here")
    args = parser.parse_args()
    if args.mode == "connections":
        conns = compare_connections(transport=args.transport, clients=args.clients, concurrency=args.concurrency,
                                    seconds=args.seconds, warmup=args.warmup, rounds=args.rounds,
                                    server_cpus=args.server_cpus, load_cpus=args.load_cpus,
                                    log=lambda line: print(line, flush=True))
        print(f"{args.transport}: idle RSS per client ours/derper {conns['ratio_idle_rss']:.2f}x, "
              f"handshakes/s {conns['ratio_handshakes']:.2f}x, CPU per handshake {conns['ratio_handshake_cpu']:.2f}x")
        if args.json:
            args.json.write_text(json.dumps(conns, indent=2))
        return 0
    shape = Shape(transport=args.transport, workers=args.workers, pairs=args.pairs, size=args.size,
                  window=args.window, seconds=args.seconds, warmup=args.warmup, server_cpus=args.server_cpus,
                  load_cpus=args.load_cpus, server_quota=args.server_quota)
    doc = compare(shape, rounds=args.rounds, placements=(args.placement,), paced_fraction=args.paced_fraction,
                  log=lambda line: print(line, flush=True))
    ours, derper = doc["ours"][args.placement], doc["derper"]
    print(f"{args.transport} workers={args.workers} pairs={args.pairs} size={args.size} window={args.window} "
          f"placement={args.placement}: "
          f"ours {ours['median']['packets_per_second']:.0f} pkt/s {ours['median']['server_us_per_packet']:.2f} us, "
          f"derper {derper['median']['packets_per_second']:.0f} pkt/s "
          f"{derper['median']['server_us_per_packet']:.2f} us; "
          f"ours/derper packets/s {ours['ratio_pps']:.2f}x, CPU/packet {ours['ratio_cpu']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
