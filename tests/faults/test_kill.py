"""kill -9 a worker, and a whole node, while 50 pairs relay continuously.

Checks: no packet ever reaches the wrong key (or arrives from the wrong source, or twice); pairs
with neither end on the killed process lose nothing; the others reconnect (same key) and resume
within RESUME_BOUND seconds; drops by reason are recorded from the workers' varz.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from tests.faults.conftest import PairTraffic, drops_by_reason, report
from tests.process.test_nodes import Node
from tests.support import ClusterProcess, await_until

PAIRS = 50
#: affected pairs must relay again within this many seconds of the kill
RESUME_BOUND = 10.0
RUN_BEFORE = 2.0
RUN_AFTER = 5.0


def _check_unaffected_lost_nothing(traffic: PairTraffic) -> int:
    flows = traffic.unaffected_flows()
    assert flows, "every pair was affected: the test proves nothing about the others"
    for flow in flows:
        assert len(flow.got) == flow.sent, f"an unaffected flow lost {flow.sent - len(flow.got)} of {flow.sent}"
    return len(flows) // 2


async def _observe_after_fault(traffic: PairTraffic, fault_at: float) -> tuple[dict[str, int], list[float], int]:
    """Let traffic run on after the fault, drain it, and return (totals, resume times of the
    affected pairs, number of unaffected pairs, each checked to have lost nothing)."""
    await asyncio.sleep(RUN_AFTER)  # traffic keeps running: the observation window after the fault
    await traffic.stop_sending()
    await traffic.drain()
    return traffic.totals(), traffic.resume_times(fault_at), _check_unaffected_lost_nothing(traffic)


async def test_kill_9_worker_while_50_pairs_relay() -> None:
    with ClusterProcess(workers=2) as cluster:
        traffic = PairTraffic([([cluster.url], [cluster.url]) for _ in range(PAIRS)])
        await traffic.start()
        try:
            await await_until(lambda: [d["directory"]["size"] for d in cluster.all_varz()] == [2 * PAIRS] * 2,
                              timeout=15, what="both workers to know every key")
            await asyncio.sleep(RUN_BEFORE)  # traffic runs: this is the observation window
            victim = cluster.worker_pids()[0]
            on_victim_before = cluster.varz(0)["worker"]["current_connections"]
            fault_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            totals, resumed, unaffected_pairs = await _observe_after_fault(traffic, fault_at)
            drops = drops_by_reason([cluster])
            report("kill -9 worker", pairs=PAIRS, clients_on_victim=on_victim_before,
                   affected_pairs=len(resumed), unaffected_pairs=unaffected_pairs,
                   resume_max_s=round(max(resumed, default=0), 2),
                   resume_median_s=round(sorted(resumed)[len(resumed) // 2], 2) if resumed else 0,
                   drops_after_restart=drops, **totals)
            assert totals["misdelivered"] == 0
            assert len(traffic.affected_pairs()) > 0, "the kill broke no connection"
            assert max(resumed) <= RESUME_BOUND, f"slowest affected pair resumed after {max(resumed):.1f}s"
            assert cluster.supervisor_state()["workers"][0]["restarts"] == 1
        finally:
            await traffic.close()


async def test_kill_9_node_while_pairs_relay_across_nodes() -> None:
    with Node("a", 901, workers=2, dead_after=2.0) as a, Node("b", 901, workers=1, join=[a], dead_after=2.0) as b:
        await await_until(lambda: a.alive_peers() == [2, 2] and b.alive_peers() == [2], timeout=30,
                          what="the mesh to form")
        # 20 pairs inside node a, 20 across the nodes, 10 inside node b; b's clients fail over to a
        both = [a.url]
        pairs = [([a.url], [a.url]) for _ in range(20)]
        pairs += [([a.url], [b.url, *both]) for _ in range(20)]
        pairs += [([b.url, *both], [b.url, *both]) for _ in range(10)]
        traffic = PairTraffic(pairs)
        await traffic.start()
        try:
            await await_until(lambda: a.dir_sizes() == [100, 100] and b.dir_sizes() == [100], timeout=20,
                              what="every directory to hold all 100 keys")
            await asyncio.sleep(RUN_BEFORE)
            assert b.proc is not None
            fault_at = time.monotonic()
            for pid in [b.proc.pid, *b.worker_pids()]:
                os.kill(pid, signal.SIGKILL)
            totals, resumed, unaffected_pairs = await _observe_after_fault(traffic, fault_at)
            await await_until(lambda: a.dir_sizes() == [100, 100], timeout=10,
                              what="node a to hold every key once b's clients failed over")
            drops = drops_by_reason([a])
            report("kill -9 node", pairs=len(pairs), affected_pairs=len(resumed),
                   unaffected_pairs=unaffected_pairs, resume_max_s=round(max(resumed, default=0), 2),
                   resume_median_s=round(sorted(resumed)[len(resumed) // 2], 2) if resumed else 0,
                   drops_on_surviving_node=drops, **totals)
            assert totals["misdelivered"] == 0
            assert len(resumed) == 30, "exactly the 30 pairs with an end on node b are affected"
            assert max(resumed) <= RESUME_BOUND, f"slowest affected pair resumed after {max(resumed):.1f}s"
        finally:
            await traffic.close()
