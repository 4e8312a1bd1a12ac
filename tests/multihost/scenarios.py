"""What the multihost tier measures, shared by its tests (which assert properties) and by
`python -m tests.multihost.figures` (which prints the figures for docs/MESH.md)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import struct
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from relay_worker.client import DerpClient, PeerGone
from tests.multihost.netns import NODES, KeyWatch, NsNode, Topology, one_way_ms
from tests.support import await_until, wait_until

Clients = list[tuple[str, DerpClient]]
HEAD = struct.Struct("!qHH")  # send time (perf_counter_ns), sender index, sequence number


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def form_mesh_sync(topo: Topology, timeout: float = 60.0) -> float:
    """Start a, b, c together (b and c join through a's public address) and wait until every worker
    sees the 5 others; returns seconds from all three serving to the full mesh."""
    topo.start_all()
    serving = time.monotonic()
    nodes = list(topo.nodes.values())
    wait_until(lambda: all(p == 5 for n in nodes for p in n.alive_peers()), timeout=timeout,
               what="every worker to see the 5 other workers", interval=0.02)
    return time.monotonic() - serving


async def connect_clients(topo: Topology, per_node: int) -> Clients:
    clients: Clients = []
    for x in NODES:
        for _ in range(per_node):
            clients.append((x, await topo.connect(x)))
    return clients


async def close_clients(clients: Clients) -> None:
    await asyncio.gather(*(c.close() for _, c in clients), return_exceptions=True)


def key_counts(topo: Topology) -> dict[tuple[str, int], int]:
    return {(n.name, i): k for n in topo.nodes.values() for i, k in enumerate(n.keys())}


async def all_keys(topo: Topology, count: int, timeout: float = 20.0) -> None:
    await await_until(lambda: all(k == count for k in key_counts(topo).values()), timeout=timeout,
                      what=f"every worker's directory to hold {count} keys", interval=0.05)


@dataclass
class Spread:
    origin: str
    join: dict[str, float]   # node -> seconds until every worker of it resolves the new key
    leave: dict[str, float]  # node -> seconds until every worker of it dropped it again


async def key_spread(topo: Topology, origin: str, timeout: float = 10.0) -> Spread:
    """A new client on `origin`: how long until every worker of every node resolves its key, and
    after it disconnects, until every worker dropped it."""
    base = key_counts(topo)
    assert len(set(base.values())) == 1, f"directories disagree before the trial: {base}"
    count = next(iter(base.values()))
    nodes = list(topo.nodes.values())
    client = await topo.connect(origin)
    watch = KeyWatch(nodes, lambda n, i, doc: doc["directory"]["keys"] == count + 1, timeout).start()
    join = await watch.result()
    watch_join = watch.per_node()
    await client.close()
    watch = KeyWatch(nodes, lambda n, i, doc: doc["directory"]["keys"] == count, timeout).start()
    await watch.result()
    assert join, "no worker ever resolved the new key"
    return Spread(origin, watch_join, watch.per_node())


@dataclass
class Exchange:
    sent: int
    received: int
    duplicates: int
    misattributed: int
    latency_ms: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def overhead(self, rtt: dict[tuple[str, str], float]) -> dict[tuple[str, str], tuple[float, float, float]]:
        """(src, dst) -> (one-way delay set on the link, p50 - it, p99 - it), ms."""
        out = {}
        for (x, y), values in sorted(self.latency_ms.items()):
            delay = one_way_ms(x, y, rtt)
            out[(x, y)] = (delay, pct(values, 0.5) - delay, pct(values, 0.99) - delay)
        return out


async def exchange(clients: Clients, rounds: int = 20, interval: float = 0.02, size: int = 200,
                   timeout: float = 20.0) -> Exchange:
    """Every client sends `rounds` packets to every other client; each receiver checks what it got:
    exactly once, from the key that sent it; one-way latency per (sender node, receiver node)."""
    n = len(clients)
    expected = rounds * (n - 1)
    index_of = {c.public_key: i for i, (_, c) in enumerate(clients)}
    got: list[Counter[tuple[int, int]]] = [Counter() for _ in range(n)]
    latency: dict[tuple[str, str], list[float]] = defaultdict(list)
    misattributed = 0
    pad = b"\0" * max(0, size - HEAD.size)

    async def receive(j: int) -> None:
        nonlocal misattributed
        node_j, client = clients[j]
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            while sum(got[j].values()) < expected:
                packet = await client.recv_packet(timeout=max(0.01, deadline - time.monotonic()))
                now = time.perf_counter_ns()
                sent, i, seq = HEAD.unpack_from(packet.data)
                if index_of.get(packet.src) != i:
                    misattributed += 1
                got[j][(i, seq)] += 1
                latency[(clients[i][0], node_j)].append((now - sent) / 1e6)
        # anything more would be a duplicate
        with contextlib.suppress(TimeoutError):
            while True:
                packet = await client.recv_packet(timeout=0.3)
                _, i, seq = HEAD.unpack_from(packet.data)
                got[j][(i, seq)] += 1

    async def send() -> None:
        for seq in range(rounds):
            for i, (_, sender) in enumerate(clients):
                for j, (_, receiver) in enumerate(clients):
                    if i != j:
                        sender.send_nowait(receiver.public_key, HEAD.pack(time.perf_counter_ns(), i, seq) + pad)
            await asyncio.gather(*(c.flush() for _, c in clients))
            await asyncio.sleep(interval)

    receivers = [asyncio.create_task(receive(j)) for j in range(n)]
    await send()
    await asyncio.gather(*receivers)
    received = sum(len(c) for c in got)
    duplicates = sum(v - 1 for c in got for v in c.values() if v > 1)
    return Exchange(expected * n, received, duplicates, misattributed, dict(latency))


async def deliveries(pairs: list[tuple[DerpClient, DerpClient]], count: int = 5, wait: float = 2.0) -> list[int]:
    """For each (sender, receiver): send `count` packets, and count how many arrive within `wait`."""
    tag = time.perf_counter_ns().to_bytes(8, "big")
    for sender, receiver in pairs:
        for k in range(count):
            sender.send_nowait(receiver.public_key, tag + bytes([k]))
        await sender.flush()

    # one reader per receiver, counting by sender (a receiver may be in several pairs)
    receivers = {id(r): r for _, r in pairs}
    seen: Counter[tuple[bytes, bytes]] = Counter()

    async def read(receiver: DerpClient) -> None:
        want = sum(count for _, r in pairs if r is receiver)
        got = 0
        deadline = time.monotonic() + wait
        with contextlib.suppress(TimeoutError):
            while got < want:
                packet = await receiver.recv_packet(timeout=max(0.01, deadline - time.monotonic()))
                if packet.data.startswith(tag):
                    seen[(packet.src, receiver.public_key)] += 1
                    got += 1

    await asyncio.gather(*(read(r) for r in receivers.values()))
    return [seen[(s.public_key, r.public_key)] for s, r in pairs]


async def drain(client: DerpClient, quiet: float = 0.5) -> list[bytes]:
    """Packets still arriving at `client` until it has been quiet for `quiet` seconds."""
    out = []
    with contextlib.suppress(TimeoutError):
        while True:
            out.append((await client.recv_packet(timeout=quiet)).data)
    return out


class Sampler:
    """A thread sampling every worker's key count and alive-peer count, for the record of a window."""

    def __init__(self, nodes: list[NsNode], interval: float = 0.01) -> None:
        self.nodes, self.interval = nodes, interval
        self.samples: list[tuple[float, str, int, int, int]] = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_flag.is_set():
            for node in self.nodes:
                for i in range(node.workers):
                    with contextlib.suppress(OSError, ValueError):
                        doc = node.varz_of(i)
                        self.samples.append((time.monotonic() - self.t0, node.name, i, doc["directory"]["keys"],
                                             doc["mesh"]["peers_alive"]))
            time.sleep(self.interval)

    def stop(self) -> list[tuple[float, str, int, int, int]]:
        self.stop_flag.set()
        self.thread.join(5)
        return self.samples

    def min_keys(self, node: str) -> int:
        return min(s[3] for s in self.samples if s[1] == node)

    def min_alive(self, node: str) -> int:
        return min(s[4] for s in self.samples if s[1] == node)


@dataclass
class Partition:
    detect: dict[str, float]                # node -> seconds until all its workers declared the far side dead
    a_alive_during: int                     # fewest alive peers any worker of a saw during the cut
    keys_during: dict[str, list[int]]       # node -> its workers' key counts during the cut
    delivered_during: dict[str, int]        # "b>c" etc. -> packets (of 5) delivered during the cut
    into_the_cut: int                       # of 5 packets b>c sent right after the cut, delivered at all
    heal: dict[str, float]                  # node -> seconds from link up to all 5 peers and all keys
    a_min_keys_heal: int                    # fewest keys any worker of a held while the cut healed
    reincarnations: dict[str, int]          # node -> reincarnations of its workers in this partition
    cut_s: float = 0.0                      # how long the link was down
    dropped_unknown: int = 0                # packets b and c dropped as `unknown_dest` while the cut held


async def partition_b_c(topo: Topology, clients: Clients, hold: float = 0.0) -> Partition:
    """Cut the b-c link (both stay up and reach a), watch, heal, watch again."""
    by_node: dict[str, list[DerpClient]] = defaultdict(list)
    for x, c in clients:
        by_node[x].append(c)
    total = len(clients)
    a, b, c = (topo.nodes[x] for x in NODES)
    reinc_before = _reincarnations(topo)
    sampler_cut = Sampler([a])
    cut_at = time.monotonic()
    topo.link("b", "c", up=False)
    # packets sent into the cut before anyone noticed: held in the proxy's and kernel's buffers
    for k in range(5):
        by_node["b"][0].send_nowait(by_node["c"][0].public_key, b"cut" + bytes([k]))
    await by_node["b"][0].flush()
    watch = KeyWatch([b, c], lambda n, i, doc: _alive_of(doc, "c" if n.name == "b" else "b") == 0,
                     timeout=topo.dead_after + 15).start(cut_at)
    await watch.result()
    detect = watch.per_node()
    # both sides dropped the other's keys; a kept everyone's
    await await_until(lambda: b.keys() == [total - len(by_node["c"])] * b.workers
                      and c.keys() == [total - len(by_node["b"])] * c.workers, timeout=10,
                      what="b and c to drop each other's keys")
    keys_during = {n.name: n.keys() for n in (a, b, c)}
    pairs = {"b>c": (by_node["b"][1], by_node["c"][1]), "c>b": (by_node["c"][1], by_node["b"][1]),
             "a>b": (by_node["a"][0], by_node["b"][1]), "b>a": (by_node["b"][1], by_node["a"][0]),
             "a>c": (by_node["a"][0], by_node["c"][1]), "c>a": (by_node["c"][1], by_node["a"][0])}
    dropped_before = _unknown_dest(b) + _unknown_dest(c)
    counts = await deliveries(list(pairs.values()))
    delivered = dict(zip(pairs, counts, strict=True))
    dropped = _unknown_dest(b) + _unknown_dest(c) - dropped_before
    if hold:
        await asyncio.sleep(hold)  # figures only: a longer partition
    sampler_cut.stop()
    a_alive = sampler_cut.min_alive("a")
    sampler = Sampler([a])
    heal_at = time.monotonic()
    topo.link("b", "c", up=True)
    watch = KeyWatch([a, b, c], lambda n, i, doc: doc["mesh"]["peers_alive"] == 5 and doc["directory"]["keys"] == total,
                     timeout=60).start(heal_at)
    await watch.result()
    heal = watch.per_node()
    await asyncio.sleep(0)  # let a's sampler run past the heal
    await await_until(lambda: time.monotonic() - heal_at > max(heal.values(), default=0) + 1.0, timeout=70)
    sampler.stop()
    late = await drain(by_node["c"][0], quiet=1.0)
    into_the_cut = sum(1 for p in late if p.startswith(b"cut"))
    reinc = {x: n - reinc_before[x] for x, n in _reincarnations(topo).items()}
    return Partition(detect, a_alive, keys_during, delivered, into_the_cut, heal, sampler.min_keys("a"), reinc,
                     heal_at - cut_at, dropped)


def _reincarnations(topo: Topology) -> dict[str, int]:
    return {n.name: sum(n.varz_of(i)["mesh"]["reincarnations"] for i in range(n.workers)) for n in topo.nodes.values()}


def _unknown_dest(node: NsNode) -> int:
    return sum(node.varz_of(i)["worker"]["drops"].get("unknown_dest", 0) for i in range(node.workers))


def _alive_of(doc: dict[str, Any], node: str) -> int:
    return sum(1 for p in doc["mesh"]["peers"].values() if p["node"] == node and p["alive"])


@dataclass
class Failover:
    keys_gone: dict[str, float]     # node -> seconds from kill -9 until all its workers dropped c's keys
    peer_gone: list[float]          # seconds until each client that heard from c's keys got PeerGone
    peer_gone_missing: int          # expected PeerGone frames that never came
    members_dead: dict[str, float]  # node -> seconds until its workers saw none of c's workers alive
    reconnect_known: dict[str, float]  # node -> seconds from reconnecting (to b) until it resolves the key again
    reachable: float                # seconds from reconnecting until a packet from a's client arrived


async def failover_kill_c(topo: Topology, clients: Clients, to: str = "b") -> tuple[Failover, DerpClient]:
    """c's clients talk to a's and b's; kill -9 node c; then c's first client reconnects to `to`."""
    by_node: dict[str, list[DerpClient]] = defaultdict(list)
    for x, client in clients:
        by_node[x].append(client)
    total = len(clients)
    listeners = by_node["a"] + by_node["b"]
    doomed = by_node["c"]
    for sender in doomed:
        for receiver in listeners:
            sender.send_nowait(receiver.public_key, b"hello from c")
        await sender.flush()
    for receiver in listeners:
        for _ in doomed:
            assert (await receiver.recv_packet(timeout=10)).data == b"hello from c"
    a, b, c = (topo.nodes[x] for x in NODES)
    survivors = [a, b]
    killed_at = time.monotonic()
    c.kill9()
    doomed_keys = {cl.public_key for cl in doomed}

    async def gone_at(receiver: DerpClient) -> list[float]:
        seen: dict[bytes, float] = {}
        deadline = killed_at + topo.dead_after + 15
        with contextlib.suppress(TimeoutError):
            while len(seen) < len(doomed_keys):
                event = await receiver.recv(timeout=max(0.01, deadline - time.monotonic()))
                if isinstance(event, PeerGone) and event.key in doomed_keys:
                    seen.setdefault(event.key, time.monotonic() - killed_at)
        return list(seen.values())

    keys_watch = KeyWatch(survivors, lambda n, i, doc: doc["directory"]["keys"] == total - len(doomed),
                          timeout=topo.dead_after + 15).start(killed_at)
    dead_watch = KeyWatch(survivors, lambda n, i, doc: _alive_of(doc, "c") == 0,
                          timeout=topo.dead_after + 15).start(killed_at)
    gone = await asyncio.gather(*(gone_at(r) for r in listeners))
    await keys_watch.result()
    await dead_watch.result()
    peer_gone = [t for times in gone for t in times]
    missing = len(listeners) * len(doomed) - len(peer_gone)
    # the client of the dead node comes back on another node, with its key
    back_at = time.monotonic()
    returned = await topo.connect(to, doomed[0].private_key)
    known = KeyWatch(survivors, lambda n, i, doc: doc["directory"]["keys"] == total - len(doomed) + 1,
                     timeout=15).start(back_at)
    sender = by_node["a"][0]
    reachable = float("nan")
    deadline = back_at + 15
    while time.monotonic() < deadline:
        await sender.send(returned.public_key, b"welcome back")
        with contextlib.suppress(TimeoutError):
            packet = await returned.recv_packet(timeout=0.02)
            if packet.data == b"welcome back":
                reachable = time.monotonic() - back_at
                break
    await known.result()
    await drain(returned, quiet=0.2)
    return Failover(keys_watch.per_node(), peer_gone, missing, dead_watch.per_node(), known.per_node(),
                    reachable), returned


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt_ms(values[0])
    return f"{fmt_ms(statistics.median(values))} (min {fmt_ms(min(values))}, max {fmt_ms(max(values))})"
