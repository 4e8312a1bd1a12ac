"""A worker is declared dead only when it is dead: a busy loop keeps its keys, a stopped or killed
process loses them.

Real processes: a 2-worker `cluster up` with the test-only stall hook (DERP_TEST_HOOKS=1: SIGUSR2
makes the worker's loop spin for DERP_TEST_STALL_SECONDS, holding the GIL like a CPU-bound flood of
cheap frames would). Workers declare each other dead after 3 s of silence (dead_after).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

from relay_worker.client import DerpClient
from relay_worker.keys import PrivateKey
from tests.faults.conftest import report
from tests.support import ClusterProcess, await_until, wait_until

DEAD_AFTER = 3.0  # the workers' silence limit (cluster/worker_main.py)
STALL = 2 * DEAD_AFTER
#: docs/MESH.md: a dead worker's keys leave within dead_after + 2 heartbeats; + 2 s for a loaded machine
DEAD_BOUND = DEAD_AFTER + 3.0
CLIENTS = 24


def view_of(cluster: ClusterProcess, viewer: int, victim: int) -> dict[str, Any]:
    doc = cluster.varz(viewer)
    return next(p for p in doc["mesh"]["peers"].values() if p["worker"] == victim)


def loop_stalls(cluster: ClusterProcess, index: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(cluster.varz(index)["mesh"]["loop"]["stalls"])
    return None


async def test_busy_loop_keeps_its_keys_stopped_or_killed_worker_loses_them() -> None:
    env = {"DERP_TEST_HOOKS": "1", "DERP_TEST_STALL_SECONDS": str(STALL)}
    with ClusterProcess(workers=2, env=env) as cluster:
        clients = [await DerpClient.connect(cluster.url, PrivateKey.generate(), timeout=10) for _ in range(CLIENTS)]
        try:
            await await_until(lambda: [d["directory"]["size"] for d in cluster.all_varz()] == [CLIENTS] * 2,
                              timeout=15, what="both workers to know every key")
            await await_until(lambda: view_of(cluster, 1, 0)["last_pulse_ago"] is not None, timeout=10,
                              what="worker 1 to hear worker 0's pulse")
            held = view_of(cluster, 1, 0)["keys"]
            assert held > 0, "no client landed on worker 0: the test would prove nothing"
            stalls_before = loop_stalls(cluster, 0)
            assert stalls_before is not None

            # 1. worker 0's loop is busy for 2 x dead_after: worker 1 must keep its keys throughout
            os.kill(cluster.worker_pids()[0], signal.SIGUSR2)
            stall_over = asyncio.create_task(asyncio.to_thread(
                wait_until, lambda: (loop_stalls(cluster, 0) or 0) > stalls_before, timeout=STALL + 20,
                what="worker 0's loop to come back from the stall"))
            samples: list[tuple[bool, int, bool]] = []
            while not stall_over.done():
                v = view_of(cluster, 1, 0)
                samples.append((v["alive"], v["keys"], v["busy"]))
                await asyncio.sleep(0.1)  # sampling period of the observation, not a wait
            await stall_over
            worker0 = cluster.varz(0)["mesh"]
            worker1 = cluster.varz(1)["mesh"]
            report("busy loop", stall_s=STALL, dead_after_s=DEAD_AFTER, keys_on_victim=held,
                   samples=len(samples), busy_samples=sum(1 for s in samples if s[2]),
                   victim_loop=worker0["loop"], victim_pulses_sent=worker0["pulses_sent"],
                   observer_deaths=worker1["deaths"])
            assert all(alive and keys == held for alive, keys, _ in samples), \
                f"worker 1 dropped the busy worker: {[s for s in samples if not s[0] or s[1] != held][:3]}"
            assert worker1["deaths"] == 0 and worker0["reincarnations"] == 0
            assert any(busy for _, _, busy in samples), "worker 1 never saw worker 0's loop silent"

            # 2. SIGSTOP: the process does not run at all (no pulses): dead, keys dropped
            pid = cluster.worker_pids()[0]
            stopped_at = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            try:
                await await_until(lambda: view_of(cluster, 1, 0)["keys"] == 0, timeout=DEAD_BOUND,
                                  what="worker 1 to drop the stopped worker's keys")
                dropped_stopped = time.monotonic() - stopped_at
            finally:
                os.kill(pid, signal.SIGCONT)
            # it comes back: learns it was declared dead, rejoins as a new incarnation with its keys
            await await_until(lambda: view_of(cluster, 1, 0)["keys"] == held, timeout=15,
                              what="the continued worker's keys to come back")

            # 3. kill -9: dead, keys dropped within the bound (the supervisor restarts it meanwhile)
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            await await_until(lambda: view_of(cluster, 1, 0)["keys"] == 0, timeout=DEAD_BOUND,
                              what="worker 1 to drop the killed worker's keys")
            report("stopped or killed", dropped_after_sigstop_s=round(dropped_stopped, 2),
                   dropped_after_kill_s=round(time.monotonic() - killed_at, 2), bound_s=DEAD_BOUND)
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.close()


async def test_busy_loop_across_nodes_with_curve_keeps_its_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same across nodes: pulses go over CURVE tcp, the limit is --node-dead-after (2 s here);
    node b's single worker spins for 3 x that while node a watches its keys."""
    from contextlib import ExitStack

    from tests.process.test_nodes import Node, keygen

    node_dead_after = 2.0
    stall = 3 * node_dead_after
    secret = keygen(tmp_path)
    with ExitStack() as stack:
        a = stack.enter_context(Node("a", 901, workers=1, secret=secret, dead_after=node_dead_after))
        b = Node("b", 901, workers=1, secret=secret, join=[a], dead_after=node_dead_after)
        b.env = {"DERP_TEST_HOOKS": "1", "DERP_TEST_STALL_SECONDS": str(stall)}
        stack.enter_context(b)
        await await_until(lambda: a.alive_peers() == [1] and b.alive_peers() == [1], timeout=30,
                          what="the two nodes to meet")
        clients = [await DerpClient.connect(b.url, PrivateKey.generate(), timeout=10) for _ in range(5)]
        try:
            await await_until(lambda: a.dir_sizes() == [5], timeout=15, what="a to know b's keys")
            # precondition (else the test proves nothing): a hears b's pulses
            await await_until(lambda: next(iter(a.varz(0)["mesh"]["peers"].values()))["last_pulse_ago"] is not None,
                              timeout=10, what="a to hear b's pulse")
            stalls_before = loop_stalls(b, 0)
            assert stalls_before is not None
            os.kill(b.worker_pids()[0], signal.SIGUSR2)
            stall_over = asyncio.create_task(asyncio.to_thread(
                wait_until, lambda: (loop_stalls(b, 0) or 0) > stalls_before, timeout=stall + 20,
                what="b's loop to come back from the stall"))
            samples: list[tuple[int, bool]] = []
            while not stall_over.done():
                view = next(iter(a.varz(0)["mesh"]["peers"].values()))
                samples.append((a.dir_sizes()[0], view["busy"]))
                await asyncio.sleep(0.1)  # sampling period of the observation, not a wait
            await stall_over
            report("busy loop across nodes (CURVE)", stall_s=stall, node_dead_after_s=node_dead_after,
                   samples=len(samples), busy_samples=sum(1 for _, busy in samples if busy),
                   a_deaths=a.varz(0)["mesh"]["deaths"], b_loop=b.varz(0)["mesh"]["loop"])
            assert all(size == 5 for size, _ in samples), f"a dropped b's keys: {samples}"
            assert a.varz(0)["mesh"]["deaths"] == 0
            assert any(busy for _, busy in samples), "a never saw b's loop silent"
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.close()
