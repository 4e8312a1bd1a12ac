"""The benchmark modes, run from the parent process: placement, timing, CPU/RSS sampling, results.

Placement (`--same-worker` / `--cross-worker`). The kernel spreads connections over the workers'
SO_REUSEPORT sockets by a hash of the 4-tuple, so a client cannot choose its worker; it can only
learn where it landed. Every worker counts the DERP connections it accepted (`accepts` in its
/debug/varz, served on its admin unix socket in the run dir, which plain HTTP polls do not touch).
So pinning connects ONE client at a time, reads every worker's counter, and files the client under
the one worker whose counter grew by exactly one. A client that lands where no pair needs it, or
whose reading is ambiguous (something else connected meanwhile), is closed and another is tried.
This needs only what a running cluster already exposes and no cooperation from the relay path.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agents import Agents
from .procfs import ClusterInfo, machine_cpu_seconds, rss_kib, total_cpu_seconds
from .stats import merge, percentiles

START_MARGIN = 0.5  # seconds between sending the start command and the agents' first packet
FLOOR_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "floor_relay.py"

Progress = Callable[[str, float, float, str], None]  # (phase, done, total, info)


def _no_progress(phase: str, done: float, total: float, info: str) -> None:
    pass


@dataclass(slots=True)
class Target:
    """A server under test: where to connect and which processes to charge CPU and RSS to."""

    label: str
    url: str
    server_pids: list[int] = field(default_factory=list)
    cluster: ClusterInfo | None = None

    def server_cpu(self) -> float | None:
        return total_cpu_seconds(self.server_pids) if self.server_pids else None

    def varz_totals(self) -> dict[str, int] | None:
        if self.cluster is None:
            return None
        totals: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError, KeyError):
            for index in self.cluster.worker_indexes:
                worker = self.cluster.varz(index)["worker"]
                for name in ("packets_received", "packets_sent", "packets_forwarded_out", "packets_forwarded_in",
                             "packets_dropped", "current_connections", "accepts"):
                    totals[name] = totals.get(name, 0) + int(worker.get(name, 0))
            return totals
        return None


def split(total: int, parts: int) -> list[int]:
    """total spread over parts as evenly as integers allow (earlier parts get the remainder)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _delta(after: dict[str, int] | None, before: dict[str, int] | None) -> dict[str, int] | None:
    if after is None or before is None:
        return None
    return {name: after[name] - before.get(name, 0) for name in after}


# -- placement ------------------------------------------------------------------------------------


def pin_pairs(agents: Agents, cluster: ClusterInfo, pairs_per_agent: list[int], placement: str,
              progress: Progress) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
    """Connect clients one by one until every pair has its ends on the workers it should.

    Pair g wants its sender on worker g mod W, and its receiver on the same worker (same-worker)
    or on the next one (cross-worker), so pairs are spread evenly over the workers either way.
    Returns each agent's (sender id, receiver id) pairs and the (sender, receiver) worker of each.
    """
    workers = cluster.worker_indexes
    if placement == "cross-worker" and len(workers) < 2:
        raise SystemExit("cluster bench: --cross-worker needs a cluster with at least 2 workers")
    all_pairs: list[list[tuple[int, int]]] = []
    layout: list[tuple[int, int]] = []
    needed = 2 * sum(pairs_per_agent)
    placed = 0
    before = cluster.accepts()
    g = 0
    for index, count in enumerate(pairs_per_agent):
        # slots[k] = [wanted worker, client id or None] for the sender, then the receiver, of each pair
        slots: list[list[Any]] = []
        for _ in range(count):
            a = workers[g % len(workers)]
            b = a if placement == "same-worker" else workers[(g + 1) % len(workers)]
            slots += [[a, None], [b, None]]
            layout.append((a, b))
            g += 1
        extras: list[int] = []
        attempts = 0
        while any(slot[1] is None for slot in slots):
            attempts += 1
            if attempts > 50 * len(slots) + 20:
                raise SystemExit(f"cluster bench: could not place clients on the wanted workers after {attempts} "
                                 "tries (is the kernel sending every connection to one worker?)")
            (client,) = agents.call(index, "connect", count=1)
            if len(workers) == 1:
                worker = workers[0]
            else:
                after = cluster.accepts()
                grown = {w: after[w] - before.get(w, 0) for w in after if after[w] != before.get(w, 0)}
                before = after
                if len(grown) != 1 or next(iter(grown.values())) != 1:
                    extras.append(client)  # ambiguous: someone else connected too
                    continue
                (worker,) = grown
            for slot in slots:
                if slot[1] is None and slot[0] == worker:
                    slot[1] = client
                    placed += 1
                    progress("placing clients", placed, needed, f"{attempts} connects")
                    break
            else:
                extras.append(client)
        if extras:
            agents.call(index, "close", ids=extras)
        all_pairs.append([(slots[k][1], slots[k + 1][1]) for k in range(0, len(slots), 2)])
    return all_pairs, layout


# -- modes ----------------------------------------------------------------------------------------


def run_relay(target: Target, *, pairs: int, size: int, window: int, seconds: float, warmup: float,
              procs: int, placement: str, drain: float = 2.0, fast_start: bool = False,
              progress: Progress = _no_progress, peer_url: str | None = None) -> dict[str, Any]:
    if size < 8:
        raise SystemExit("cluster bench: --size must be at least 8 (the timestamp)")
    procs = max(1, min(procs, pairs))
    pairs_per_agent = split(pairs, procs)
    with Agents(procs, target.url, fast_start=fast_start) as agents:
        progress("connecting", 0, 2 * pairs, "")
        if peer_url:
            # cross-node: the first end of every pair on target.url, the second on another node
            firsts = agents.call_all("connect", [{"count": n} for n in pairs_per_agent])
            seconds_ = agents.call_all("connect", [{"count": n, "url": peer_url} for n in pairs_per_agent])
            agent_pairs = [list(zip(firsts[i], seconds_[i], strict=True)) for i in range(procs)]
            layout: list[tuple[int, int]] = []
            placement = "cross-node"
        elif placement in ("same-worker", "cross-worker") and target.cluster is not None:
            agent_pairs, layout = pin_pairs(agents, target.cluster, pairs_per_agent, placement, progress)
        else:
            ids = agents.call_all("connect", [{"count": 2 * n} for n in pairs_per_agent])
            agent_pairs = [[(ids[i][2 * k], ids[i][2 * k + 1]) for k in range(n)]
                           for i, n in enumerate(pairs_per_agent)]
            layout = []
            # A one-process server (the floor, a single worker) has only one place to put a pair.
            placement = "single-process" if len(target.server_pids) == 1 else "unpinned"
        t_start = time.monotonic() + START_MARGIN
        t_measure = t_start + warmup
        t_end = t_measure + seconds
        samples: dict[str, Any] = {}

        def sample(tag: str) -> Callable[[], None]:
            def take() -> None:
                samples[tag] = (target.server_cpu(), total_cpu_seconds(agents.pids), machine_cpu_seconds(),
                                target.varz_totals(), time.monotonic())
            return take

        def on_progress(received: int) -> None:
            now = time.monotonic()
            progress("relaying", min(now - t_start, t_end - t_start), t_end - t_start, f"{received:,} packets")

        results = agents.call_all(
            "relay",
            [{"pairs": agent_pairs[i], "size": size, "window": window, "t_start": t_start, "t_measure": t_measure,
              "t_end": t_end, "drain": drain} for i in range(procs)],
            on_progress, until=[(t_measure, sample("start")), (t_end, sample("end"))])
        agents.call_all("close_all")
    cpu0, agent0, machine0, varz0, when0 = samples["start"]
    cpu1, agent1, machine1, varz1, when1 = samples["end"]
    elapsed = when1 - when0
    window_received = sum(r["window_received"] for r in results)
    sent = sum(r["sent"] for r in results)
    received = sum(r["received"] for r in results)
    server_cpu = None if cpu0 is None else cpu1 - cpu0
    pps = window_received / seconds
    return {
        "mode": "relay",
        "target": target.label,
        "url": target.url,
        "placement": placement,
        "pairs": pairs,
        "size": size,
        "window": window,
        "seconds": seconds,
        "warmup": warmup,
        "procs": procs,
        "sent": sent,
        "received": received,
        "drops": sent - received,
        "window_received": window_received,
        "packets_per_sec": pps,
        "mbit_per_sec": pps * size * 8 / 1e6,
        "latency_us": percentiles(merge(r["latency_us"] for r in results)),
        "server_pids": target.server_pids,
        "server_cpu_seconds": server_cpu,
        "server_cpu_percent": None if server_cpu is None else 100.0 * server_cpu / elapsed,
        "server_cpu_us_per_packet": (None if server_cpu is None or not window_received
                                     else server_cpu * 1e6 / window_received),
        "client_cpu_percent": 100.0 * (agent1 - agent0) / elapsed,
        "machine_cpu_percent": 100.0 * (machine1 - machine0) / elapsed,
        "other_cpu_percent": 100.0 * ((machine1 - machine0) - (agent1 - agent0) - (server_cpu or 0.0)) / elapsed,
        "cores": os.cpu_count(),
        "server_counters": _delta(varz1, varz0),
        "pair_workers": layout,
        "peer_gone_frames": sum(r["peer_gone"] for r in results),
        "lost_connections": sum(r["lost_connections"] for r in results),
    }


def run_connect(target: Target, *, concurrency: int, seconds: float, warmup: float, procs: int,
                fast_start: bool = False, progress: Progress = _no_progress) -> dict[str, Any]:
    procs = max(1, min(procs, concurrency))
    with Agents(procs, target.url, fast_start=fast_start) as agents:
        t_start = time.monotonic() + START_MARGIN + 1.0  # the agents first derive their client boxes
        t_measure = t_start + warmup
        t_end = t_measure + seconds
        samples: dict[str, Any] = {}

        def sample(tag: str) -> Callable[[], None]:
            def take() -> None:
                samples[tag] = (target.server_cpu(), total_cpu_seconds(agents.pids), machine_cpu_seconds(),
                                time.monotonic())
            return take

        def on_progress(done: int) -> None:
            now = time.monotonic()
            progress("handshaking", max(0.0, min(now - t_start, t_end - t_start)), t_end - t_start,
                     f"{done:,} handshakes")

        results = agents.call_all(
            "handshakes",
            [{"concurrency": c, "t_start": t_start, "t_measure": t_measure, "t_end": t_end}
             for c in split(concurrency, procs)],
            on_progress, until=[(t_measure, sample("start")), (t_end, sample("end"))])
    cpu0, agent0, machine0, when0 = samples["start"]
    cpu1, agent1, machine1, when1 = samples["end"]
    elapsed = when1 - when0
    done = sum(r["window_handshakes"] for r in results)
    workers = len(target.cluster.worker_indexes) if target.cluster is not None else max(1, len(target.server_pids))
    server_cpu = None if cpu0 is None else cpu1 - cpu0
    error_kinds: dict[str, int] = {}
    for r in results:
        for name, count in r["error_kinds"].items():
            error_kinds[name] = error_kinds.get(name, 0) + count
    return {
        "mode": "connect",
        "target": target.label,
        "url": target.url,
        "concurrency": concurrency,
        "seconds": seconds,
        "warmup": warmup,
        "procs": procs,
        "workers": workers,
        "handshakes": done,
        "handshakes_per_sec": done / seconds,
        "handshakes_per_sec_per_worker": done / seconds / workers,
        "handshake_latency_us": percentiles(merge(r["latency_us"] for r in results)),
        "errors": sum(r["errors"] for r in results),
        "error_kinds": error_kinds,
        "server_pids": target.server_pids,
        "server_cpu_percent": None if server_cpu is None else 100.0 * server_cpu / elapsed,
        "server_cpu_us_per_handshake": None if server_cpu is None or not done else server_cpu * 1e6 / done,
        # What one fully busy core would sustain at that cost: on a box the generator (and anything
        # else) shares, the measured rate is capped by the CPU the worker got, not by its code.
        "handshakes_per_cpu_second": None if not server_cpu or not done else done / server_cpu,
        "client_cpu_percent": 100.0 * (agent1 - agent0) / elapsed,
        "machine_cpu_percent": 100.0 * (machine1 - machine0) / elapsed,
        "other_cpu_percent": 100.0 * ((machine1 - machine0) - (agent1 - agent0) - (server_cpu or 0.0)) / elapsed,
        "cores": os.cpu_count(),
    }


def run_idle(target: Target, *, clients: int, procs: int, concurrency: int, settle: float = 1.0,
             fast_start: bool = False, progress: Progress = _no_progress) -> dict[str, Any]:
    if not target.server_pids:
        raise SystemExit("cluster bench idle: needs the server's pids (--run-dir or --server-pids) to read RSS")
    procs = max(1, min(procs, clients))
    with Agents(procs, target.url, fast_start=fast_start) as agents:
        agents.call_all("alive")  # wait until every agent is up before taking the baseline
        rss_before = {pid: rss_kib(pid) for pid in target.server_pids}
        varz_before = target.varz_totals()
        started = time.monotonic()
        agents.call_all("connect", [{"count": n, "concurrency": max(1, concurrency // procs)}
                                    for n in split(clients, procs)],
                        lambda done: progress("connecting", done, clients, f"{done:,} clients"))
        connect_seconds = time.monotonic() - started
        time.sleep(settle)  # let the server finish whatever each handshake left behind
        rss_after = {pid: rss_kib(pid) for pid in target.server_pids}
        varz_after = target.varz_totals()
        alive = sum(agents.call_all("alive"))
        ring = agents.call_all("ring", on_progress=lambda done: progress("verifying relay", done, clients,
                                                                          f"{done:,} delivered"))
        rss_after_ring = {pid: rss_kib(pid) for pid in target.server_pids}
        agents.call_all("close_all")
    grown = sum(rss_after.values()) - sum(rss_before.values())
    grown_ring = sum(rss_after_ring.values()) - sum(rss_before.values())
    counters = _delta(varz_after, varz_before)
    return {
        "mode": "idle",
        "target": target.label,
        "url": target.url,
        "clients": clients,
        "procs": procs,
        "connect_seconds": connect_seconds,
        "connects_per_sec": clients / connect_seconds if connect_seconds else None,
        "alive": alive,
        "server_pids": target.server_pids,
        "server_connections_added": None if counters is None else counters["current_connections"],
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_per_client_kib": grown / clients,
        "rss_after_relay_kib": rss_after_ring,
        "rss_per_client_after_relay_kib": grown_ring / clients,
        "relay_checked": sum(r["clients"] for r in ring),
        "relay_delivered": sum(r["delivered"] for r in ring),
    }


# -- the floor relay ------------------------------------------------------------------------------


@contextlib.contextmanager
def floor_relay(host: str = "127.0.0.1", per_frame_writes: bool = False) -> Any:
    """Start bench/floor_relay.py on a free port; yield its Target."""
    import socket

    if not FLOOR_SCRIPT.exists():
        raise SystemExit(f"cluster bench: {FLOOR_SCRIPT} not found (--compare-floor needs a source checkout)")
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    extra = ["--per-frame-writes"] if per_frame_writes else []
    proc = subprocess.Popen([sys.executable, str(FLOOR_SCRIPT), "--listen", f"{host}:{port}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening" not in line:
            raise SystemExit(f"cluster bench: the floor relay did not start: {line}{proc.stdout.read()}")
        label = "floor (per-frame writes)" if per_frame_writes else "floor"
        yield Target(label, f"http://{host}:{port}/derp", [proc.pid])
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
