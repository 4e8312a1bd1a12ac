"""Faults of the ZeroMQ mesh: a worker that is SIGSTOPped and resumed, a partition between nodes (a
SIGSTOPped node), and duplicated / reordered directory messages, both in-process (hypothesis over
mesh.directory) and live (a raw ZeroMQ PUSH replaying DIR_DELTA messages into a worker's inbox).

In each, the directory must converge to one state and forwarding must resume within RESUME_BOUND
seconds of the fault ending, with no packet ever delivered to the wrong key.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from contextlib import suppress

import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.directory import Directory, Entry, Owner, Record, encode_entries
from mesh.hlc import HLC, pack
from relay_worker import frames as F
from relay_worker.client import DerpClient, PeerGone
from tests.faults.conftest import PairTraffic, drops_by_reason, report
from tests.process.test_nodes import Node
from tests.support import ClusterProcess, await_until

RESUME_BOUND = 10.0


def first_delivery_after(traffic: PairTraffic, since: float, flows: list[tuple[int, int]]) -> list[float]:
    """Per flow: seconds from `since` to the first packet sent after `since` that arrived."""
    out = []
    for key in flows:
        times = [recv for sent_at, recv in traffic.flows[key].deliveries if sent_at >= since]
        out.append(min(times) - since if times else float("inf"))
    return out


async def test_sigstopped_worker_is_declared_dead_then_rejoins_and_forwarding_resumes() -> None:
    with ClusterProcess(workers=2) as cluster:
        traffic = PairTraffic([([cluster.url], [cluster.url]) for _ in range(20)])
        await traffic.start()
        try:
            await await_until(lambda: [d["directory"]["size"] for d in cluster.all_varz()] == [40, 40],
                              timeout=15, what="directory sync")
            await asyncio.sleep(1.0)  # traffic runs before the fault
            stopped = cluster.worker_pids()[1]
            os.kill(stopped, signal.SIGSTOP)
            try:
                # only worker 0 answers while 1 is stopped; it must declare 1 dead (3 s) and drop its keys
                await await_until(lambda: cluster.varz(0)["mesh"]["deaths"] >= 1, timeout=10,
                                  what="worker 0 to declare the stopped worker dead")
                keys_during = cluster.varz(0)["directory"]["size"]
            finally:
                os.kill(stopped, signal.SIGCONT)
            resumed_at = time.monotonic()
            await await_until(lambda: [d["directory"]["size"] for d in cluster.all_varz()] == [40, 40]
                              and [d["mesh"]["peers_alive"] for d in cluster.all_varz()] == [1, 1],
                              timeout=RESUME_BOUND, what="the directory to converge after SIGCONT")
            converged = time.monotonic() - resumed_at
            await asyncio.sleep(2.0)  # traffic after the fault, to measure forwarding
            await traffic.stop_sending()
            await traffic.drain()
            resume = first_delivery_after(traffic, resumed_at, list(traffic.flows))
            varz1 = cluster.varz(1)["mesh"]
            report("SIGSTOP a worker past dead_after", keys_on_worker0_during_stop=keys_during,
                   converge_after_sigcont_s=round(converged, 2), forwarding_resume_max_s=round(max(resume), 2),
                   reincarnations=varz1["reincarnations"], drops=drops_by_reason([cluster]), **traffic.totals())
            assert keys_during < 40, "the stopped worker's keys left worker 0's directory"
            assert traffic.totals()["misdelivered"] == 0
            assert max(resume) <= RESUME_BOUND, f"a flow resumed only after {max(resume):.1f}s"
            assert not any(p.affected for p in traffic.peers), "no client should have been disconnected"
        finally:
            await traffic.close()


async def test_partition_between_nodes_heals_and_forwarding_resumes() -> None:
    with Node("a", 901, workers=1, dead_after=2.0) as a, Node("b", 901, workers=1, join=[a], dead_after=2.0) as b:
        await await_until(lambda: a.alive_peers() == [1] and b.alive_peers() == [1], timeout=30, what="mesh")
        # pairs 0..9 cross the partition, pairs 10..14 live inside node a
        pairs = [([a.url], [b.url]) for _ in range(10)] + [([a.url], [a.url]) for _ in range(5)]
        traffic = PairTraffic(pairs)
        await traffic.start()
        try:
            await await_until(lambda: a.dir_sizes() == [30] and b.dir_sizes() == [30], timeout=20,
                              what="directory sync")
            await asyncio.sleep(1.0)
            assert b.proc is not None
            b_pids = [b.proc.pid, *b.worker_pids()]
            for pid in b_pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                await await_until(lambda: a.dir_sizes() == [20], timeout=10, what="a to drop b's 10 keys")
            finally:
                for pid in b_pids:
                    os.kill(pid, signal.SIGCONT)
            healed_at = time.monotonic()
            await await_until(lambda: a.dir_sizes() == [30] and b.dir_sizes() == [30], timeout=RESUME_BOUND,
                              what="the partition to heal")
            converged = time.monotonic() - healed_at
            await asyncio.sleep(2.0)
            await traffic.stop_sending()
            await traffic.drain()
            cross = [(2 * i, 2 * i + 1) for i in range(10)] + [(2 * i + 1, 2 * i) for i in range(10)]
            inside = [(2 * i, 2 * i + 1) for i in range(10, 15)] + [(2 * i + 1, 2 * i) for i in range(10, 15)]
            resume = first_delivery_after(traffic, healed_at, cross)
            lost_cross = sum(traffic.flows[k].sent - len(traffic.flows[k].got) for k in cross)
            report("partition (SIGSTOP node b past node-dead-after)", converge_after_heal_s=round(converged, 2),
                   cross_node_resume_max_s=round(max(resume), 2), cross_node_packets_lost=lost_cross,
                   inside_a_packets_lost=sum(traffic.flows[k].sent - len(traffic.flows[k].got) for k in inside),
                   reincarnations_b=b.varz()["mesh"]["reincarnations"], drops=drops_by_reason([a, b]),
                   **traffic.totals())
            assert traffic.totals()["misdelivered"] == 0
            assert max(resume) <= RESUME_BOUND
            for key in inside:
                flow = traffic.flows[key]
                assert len(flow.got) == flow.sent, "pairs inside the healthy node lose nothing"
        finally:
            await traffic.close()


# -- duplicated and reordered directory messages, in-process ---------------------------------------------

OWNERS = [Owner("n1", 0), Owner("n1", 1), Owner("n2", 0)]
KEYS = [bytes([i]) * 32 for i in range(5)]
ops = st.lists(st.tuples(st.integers(0, len(OWNERS) - 1), st.sampled_from(["add", "remove", "prefer", "unprefer"]),
                         st.integers(0, len(KEYS) - 1)), min_size=1, max_size=30)


def _run_owners(operations: list[tuple[int, str, int]]) -> tuple[list[Directory], list[list[Record]]]:
    """Each owner writes its own slots; every local write yields one delta message."""
    now = [1_700_000_000_000]

    def clock() -> int:
        now[0] += 1
        return now[0]

    owners = [Directory(o, 1, clock=HLC(clock)) for o in OWNERS]
    epochs = [0] * len(OWNERS)
    live: list[dict[bytes, int]] = [{} for _ in OWNERS]
    messages: list[list[Record]] = []
    for who, op, k in operations:
        d, key = owners[who], KEYS[k]
        if op == "add":
            epochs[who] += 1
            live[who][key] = epochs[who]
            delta = d.local_add(key, epochs[who])
        elif op == "remove" and key in live[who]:
            delta = d.local_remove(key, live[who].pop(key))
        elif op in ("prefer", "unprefer") and key in live[who]:
            delta = d.local_set_preferred(key, live[who][key], op == "prefer")
        else:
            continue
        if delta:
            messages.append(list(delta.entries))
    return owners, messages


@settings(max_examples=150, deadline=None)
@given(operations=ops, seed=st.integers(0, 2**32 - 1), dup_factor=st.integers(1, 3))
def test_directory_converges_whatever_the_duplication_and_order(operations: list[tuple[int, str, int]], seed: int,
                                                                 dup_factor: int) -> None:
    owners, messages = _run_owners(operations)
    in_order = Directory()
    for message in messages:
        in_order.merge(message)
    rng = random.Random(seed)
    replicas = []
    for _ in range(3):
        delivery = [m for m in messages for _ in range(rng.randint(1, dup_factor))]
        rng.shuffle(delivery)
        replica = Directory()
        for message in delivery:
            replica.merge(message)
        replicas.append(replica)
    # the owners, too, receive each other's messages shuffled and duplicated
    for index, owner in enumerate(owners):
        others = [m for m in messages if m[0][1].owner != OWNERS[index]] * 2
        rng.shuffle(others)
        for message in others:
            owner.merge(message)
    for replica in [*replicas, *owners]:
        assert replica.resolved == in_order.resolved
        assert replica.digest() == in_order.digest()
    # and the resolved map is the truth: a key resolves iff some owner still holds it, to a holder
    for key in KEYS:
        holders = {OWNERS[i] for i, o in enumerate(owners) if key in dict(o.local_entries())}
        assert (key in in_order.resolved) == bool(holders)
        if holders:
            assert in_order.resolved[key] in holders


# -- duplicated and reordered DIR_DELTA messages, live --------------------------------------------------


def _delta(node: str, worker: int, inc: int, records: list[Record]) -> bytes:
    """A DIR_DELTA as a worker sends it (mesh/worker_mesh.py `_broadcast_records` + `_envelope`)."""
    return wire.build_control(wire.DIR_DELTA, {"node": node, "worker": worker, "inc": inc,
                                               "entries": encode_entries(records)})


async def test_replayed_and_reordered_dir_deltas_into_a_live_worker_converge() -> None:
    # No mesh secret on loopback: no CURVE, so a raw PUSH reaches the inbox, as a duplicate or late
    # message from a real member would.
    with Node("a", 901, workers=2) as node:
        await await_until(lambda: node.alive_peers() == [1, 1], timeout=20, what="the two workers to meet")
        clients = [await DerpClient.connect(node.url) for _ in range(6)]
        context = zmq.Context()
        pushes = []
        try:
            await await_until(lambda: node.dir_sizes() == [6, 6], timeout=10, what="directory sync")
            for index in range(2):
                push = context.socket(zmq.PUSH)
                push.setsockopt(zmq.LINGER, 1000)
                push.connect(f"tcp://127.0.0.1:{node.mesh_port + index}")
                pushes.append(push)
            ghost = Owner("ghost", 0)
            now = pack(int(time.time() * 1000))
            gone, kept = os.urandom(32), os.urandom(32)
            add_gone = _delta("ghost", 0, 1, [(gone, Entry(ghost, 1, 1, now, False, True))])
            del_gone = _delta("ghost", 0, 1, [(gone, Entry(ghost, 1, 1, now + 5, False, False))])
            add_kept = _delta("ghost", 0, 1, [(kept, Entry(ghost, 1, 2, now + 1, False, True))])
            # Stale tombstones for a real client's slot, stamped long ago, in the name of each worker's
            # current incarnation (one of them owns the key): they must lose to the live entry.
            victim = clients[0].public_key
            incarnations = [d["mesh"]["incarnation"] for d in node.all_varz()]
            stale_records = [
                _delta("a", w, inc, [(victim, Entry(Owner("a", w), inc, 1, pack(1), False, False))])
                for w, inc in enumerate(incarnations)
            ]
            # worker 0 gets: tombstone before the add, each twice, interleaved with the stale record;
            # worker 1 gets the add only (the tombstone must reach it by anti-entropy from worker 0)
            for message in [del_gone, *stale_records, add_gone, add_kept, del_gone, add_gone,
                            *reversed(stale_records), add_kept]:
                pushes[0].send(message)
            for message in [add_gone, add_kept, add_gone]:
                pushes[1].send(message)
            started = time.monotonic()
            steady_since = [0.0]

            def steady() -> bool:
                # [7, 7] can be seen in passing (a worker that merged one add but not the other),
                # so require it to hold across three anti-entropy rounds (heartbeats every 0.5 s)
                if node.dir_sizes() != [7, 7]:
                    steady_since[0] = 0.0
                    return False
                steady_since[0] = steady_since[0] or time.monotonic()
                return time.monotonic() - steady_since[0] >= 1.5

            await await_until(steady, timeout=RESUME_BOUND, interval=0.1,
                              what="both workers to hold the 6 clients + the kept ghost key, not the removed one")
            converged = steady_since[0] - started
            # user-visible, from clients on both workers: the removed key is unknown (PeerGone
            # not-here for a disco packet), and the real clients still reach each other,
            # including the one the stale tombstones named
            for sender in clients:
                await sender.send(gone, F.DISCO_MAGIC + bytes(70))
                event = await sender.recv(timeout=5)
                while not isinstance(event, PeerGone):
                    event = await sender.recv(timeout=5)
                assert event == PeerGone(gone, F.PEER_GONE_NOT_HERE)
            for a, b in [(clients[1], clients[0]), (clients[0], clients[5]), (clients[4], clients[2])]:
                await _relay_eventually(a, b)
            varz = node.all_varz()
            report("replayed / reordered DIR_DELTA (live)", messages_to_worker0=10, messages_to_worker1=3,
                   converge_s=round(converged, 2), directory_sizes=node.dir_sizes(),
                   bad_messages=[d["mesh"]["bad_messages"] for d in varz])
            assert all(d["mesh"]["bad_messages"] == 0 for d in varz)
        finally:
            for push in pushes:
                push.close()
            context.term()
            for client in clients:
                await client.close()


async def _relay_eventually(a: DerpClient, b: DerpClient) -> None:
    for attempt in range(30):
        await a.send(b.public_key, b"after replay %d" % attempt)
        with suppress(TimeoutError):
            got = await b.recv_packet(timeout=0.2)
            assert got.src == a.public_key
            return
    raise AssertionError("forwarding did not work after the replayed deltas")
