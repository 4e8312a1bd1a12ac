"""Shared machinery of the fault suite: continuous pair traffic that checks every packet it
receives, figure reporting, and small process helpers.

`PairTraffic` runs N pairs of DERP clients that send to each other continuously. Every payload
carries (src key, dst key, sequence number, send time), so a receiver checks each packet the moment
it arrives: a packet for another key, from the wrong source, or seen twice is a misdelivery. A
client whose connection breaks reconnects with the same key (to the next URL of its list, as a
Tailscale client fails over within a region) and carries on; the pair is then "affected" and is
judged by how soon it resumed, not by what it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from relay_worker.client import DerpClient, DerpClientError, RecvPacket
from relay_worker.keys import PrivateKey
from tests.support import ClusterProcess, rss_kib

HEADER = struct.Struct(">32s32sQd")  # src key, dst key, sequence, sender's monotonic send time
PAD = b"\x00" * 64


def report(test: str, **figures: Any) -> None:
    """Print a test's figures on one line (visible with `pytest -s`); docs/FAULTS.md quotes them."""
    print(f"\n[fault figures] {test}: {json.dumps(figures, sort_keys=True, default=str)}", flush=True)


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `want` (up to the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def worker_rss_kib(cluster: ClusterProcess) -> list[int]:
    return [rss_kib(pid) for pid in cluster.worker_pids() if pid]


def drops_by_reason(clusters: list[ClusterProcess]) -> dict[str, int]:
    """Drop counters summed over every live worker of the given clusters (zeros left out)."""
    total: Counter[str] = Counter()
    for cluster in clusters:
        for doc in cluster.all_varz():
            total.update(doc["worker"]["drops"])
            total["mesh_packets_dropped_full"] += doc["mesh"].get("packets_dropped_full", 0)
    return {reason: count for reason, count in sorted(total.items()) if count}


@dataclass
class Flow:
    """One direction of a pair."""

    sent: int = 0  # packets written to the sender's socket, sequence numbers 0..sent-1
    got: set[int] = field(default_factory=set)
    deliveries: list[tuple[float, float]] = field(default_factory=list)  # (sent_at, received_at)


class Peer:
    def __init__(self, traffic: PairTraffic, index: int, urls: list[str]) -> None:
        self.traffic = traffic
        self.index = index
        self.urls = urls
        self.key = PrivateKey.generate()
        self.pub = self.key.public().raw
        self.partner: Peer | None = None
        self.client: DerpClient | None = None
        self.broken_at: list[float] = []
        self.reconnected_at: list[float] = []

    @property
    def affected(self) -> bool:
        return bool(self.broken_at)

    async def connect(self) -> None:
        self.client = await DerpClient.connect(self.urls[0], self.key, timeout=10)

    async def reconnect(self) -> None:
        """Same key, next URL on each failure, until it works or the traffic stops."""
        attempt = 0
        while not self.traffic.stopping:
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                self.client = await DerpClient.connect(url, self.key, timeout=3)
                self.reconnected_at.append(time.monotonic())
                return
            except (DerpClientError, OSError, TimeoutError):
                await asyncio.sleep(0.1)  # retry pacing, as a real client backs off

    async def read_loop(self) -> None:
        while not self.traffic.stopping:
            client = self.client
            if client is None:
                await self.reconnect()
                continue
            try:
                event = await client.recv()
            except (DerpClientError, OSError, ValueError):
                # the server went away under us: remember when, and come back with the same key
                self.broken_at.append(time.monotonic())
                self.client = None
                with contextlib.suppress(Exception):
                    await client.close()
                continue
            if isinstance(event, RecvPacket):
                self.traffic.check(self, event)

    async def send_loop(self, interval: float) -> None:
        assert self.partner is not None
        flow = self.traffic.flows[(self.index, self.partner.index)]
        while not self.traffic.stopping:
            client = self.client
            if client is not None and not client.closed:
                payload = HEADER.pack(self.pub, self.partner.pub, flow.sent, time.monotonic()) + PAD
                try:
                    client.send_nowait(self.partner.pub, payload)
                    await client.flush()
                    flow.sent += 1
                except (OSError, DerpClientError, RuntimeError):
                    pass  # not written: not counted as sent; the reader notices the break
            await asyncio.sleep(interval)  # pacing, not synchronisation


class PairTraffic:
    """`pairs` is a list of (urls of A, urls of B); each endpoint's first URL is where it starts."""

    def __init__(self, pairs: list[tuple[list[str], list[str]]], interval: float = 0.05) -> None:
        self.interval = interval
        self.peers: list[Peer] = []
        self.flows: dict[tuple[int, int], Flow] = {}
        for urls_a, urls_b in pairs:
            a, b = Peer(self, len(self.peers), urls_a), Peer(self, len(self.peers) + 1, urls_b)
            a.partner, b.partner = b, a
            self.peers += [a, b]
            self.flows[(a.index, b.index)] = Flow()
            self.flows[(b.index, a.index)] = Flow()
        self.by_key = {p.pub: p for p in self.peers}
        self.misdelivered = 0
        self.wrong_source = 0
        self.duplicates = 0
        self.alien = 0
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []

    def check(self, receiver: Peer, event: RecvPacket) -> None:
        """Every received packet, at once: right key, right source, first time."""
        try:
            src, dst, seq, sent_at = HEADER.unpack_from(event.data)
        except struct.error:
            self.alien += 1
            return
        if dst != receiver.pub:
            self.misdelivered += 1
            return
        if event.src != src:
            self.wrong_source += 1
            return
        sender = self.by_key.get(src)
        if sender is None:
            self.alien += 1
            return
        flow = self.flows.get((sender.index, receiver.index))
        if flow is None:
            self.misdelivered += 1  # a peer that is not this receiver's partner
            return
        if seq in flow.got:
            self.duplicates += 1
            return
        flow.got.add(seq)
        flow.deliveries.append((sent_at, time.monotonic()))

    async def start(self) -> None:
        # connect in small batches: a burst of 100 handshakes is not what this suite measures
        for start in range(0, len(self.peers), 20):
            await asyncio.gather(*(p.connect() for p in self.peers[start : start + 20]))
        for peer in self.peers:
            self.tasks.append(asyncio.create_task(peer.read_loop()))
        for peer in self.peers:
            self.tasks.append(asyncio.create_task(peer.send_loop(self.interval)))

    async def stop_sending(self) -> None:
        for task in self.tasks[len(self.peers) :]:
            task.cancel()
        await asyncio.gather(*self.tasks[len(self.peers) :], return_exceptions=True)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until every unaffected flow has received all it sent (or the deadline passes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.missing_unaffected():
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(p.client.close() for p in self.peers if p.client is not None),
                             return_exceptions=True)

    # -- figures ------------------------------------------------------------------------------------

    def pair_affected(self, a: int, b: int) -> bool:
        return self.peers[a].affected or self.peers[b].affected

    def missing_unaffected(self) -> int:
        return sum(flow.sent - len(flow.got) for (a, b), flow in self.flows.items() if not self.pair_affected(a, b))

    def unaffected_flows(self) -> list[Flow]:
        return [flow for (a, b), flow in self.flows.items() if not self.pair_affected(a, b)]

    def affected_pairs(self) -> list[tuple[Peer, Peer]]:
        return [(a, b) for a, b in zip(self.peers[::2], self.peers[1::2], strict=True) if a.affected or b.affected]

    def resume_times(self, fault_at: float) -> list[float]:
        """For each affected pair: seconds from the fault to the first packet (either direction) that
        was sent after both ends were connected again and was delivered."""
        out = []
        for a, b in self.affected_pairs():
            back = max([fault_at, *a.reconnected_at[-1:], *b.reconnected_at[-1:]])
            firsts = [recv for flow in (self.flows[(a.index, b.index)], self.flows[(b.index, a.index)])
                      for sent_at, recv in flow.deliveries if sent_at >= back]
            out.append(min(firsts) - fault_at if firsts else float("inf"))
        return out

    def totals(self) -> dict[str, int]:
        return {
            "sent": sum(f.sent for f in self.flows.values()),
            "received": sum(len(f.got) for f in self.flows.values()),
            "misdelivered": self.misdelivered + self.wrong_source + self.duplicates + self.alien,
        }
