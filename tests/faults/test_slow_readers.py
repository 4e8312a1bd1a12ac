"""Clients that read slowly, never read, or stop reading in the middle of a frame.

Bounds, each measured against a baseline taken in the same test on the same cluster (machines are
noisy, so these are ratios, not absolute times):
- others' throughput (packets delivered between well-behaved pairs in a fixed window) stays at or
  above THROUGHPUT_RATIO of the baseline;
- others' median one-way latency stays under LATENCY_FACTOR x baseline + LATENCY_SLACK_MS;
- the worker's RSS grows by less than RSS_BOUND_MIB while 100 MB are flooded at a never-reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay_worker import frames as F
from relay_worker.client import DerpClient, DerpClientError, RecvPacket
from relay_worker.keys import PrivateKey
from tests.faults.conftest import report, worker_rss_kib
from tests.support import ClusterProcess, RawConn, await_until, rss_kib

THROUGHPUT_RATIO = 0.5
LATENCY_FACTOR = 4.0
LATENCY_SLACK_MS = 20.0
RSS_BOUND_MIB = 64
WINDOW = 2.0
FLOOD_BYTES = 100 * 1024 * 1024
STAMP = struct.Struct(">d")


async def raw_client(port: int, key: PrivateKey, *, rcvbuf: int = 4096) -> socket.socket:
    """A handshaken DERP connection on a plain non-blocking socket, so the test decides exactly how
    much it reads. A small receive buffer makes the server feel a stalled reader sooner."""
    return (await RawConn.open(port, key=key, rcvbuf=rcvbuf)).sock


async def slow_reader(sock: socket.socket, rate: int, stop: asyncio.Event) -> int:
    """Read `rate` bytes a second in 10 slices; returns what it read."""
    loop = asyncio.get_running_loop()
    got = 0
    with contextlib.suppress(OSError):
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(loop.sock_recv(sock, rate // 10), 0.1)
                if not data:
                    break
                got += len(data)
            await asyncio.sleep(0.1)  # pacing: this is what a slow reader is
    return got


async def stop_mid_frame(sock: socket.socket) -> None:
    """Read the header and half of the first relayed frame, then never read again."""
    loop = asyncio.get_running_loop()
    head = b""
    while len(head) < F.HEADER_LEN:
        head += await loop.sock_recv(sock, F.HEADER_LEN - len(head))
    length = int.from_bytes(head[1:5], "big")
    await loop.sock_recv(sock, max(1, length // 2))


@dataclass
class Workload:
    """Well-behaved pairs pushing 1000-byte packets as fast as the server takes them; every
    `every`-th packet goes to `side_target()` instead (a normal reader in the baseline, a hostile
    one under attack), so the server does similar work in both phases."""

    senders: list[DerpClient]
    receivers: list[DerpClient]
    side_target: Callable[[], bytes]
    every: int = 4
    delivered: int = 0
    latencies: list[float] = field(default_factory=list)
    counting: bool = False

    async def send(self, stop: asyncio.Event) -> None:
        async def one(sender: DerpClient, receiver: DerpClient) -> None:
            n = 0
            while not stop.is_set():
                for _ in range(16):
                    n += 1
                    dst = self.side_target() if n % self.every == 0 else receiver.public_key
                    sender.send_nowait(dst, STAMP.pack(time.monotonic()) + bytes(992))
                await sender.flush()
                await asyncio.sleep(0)

        await asyncio.gather(*(one(s, r) for s, r in zip(self.senders, self.receivers, strict=True)))

    async def receive(self, stop: asyncio.Event) -> None:
        async def one(receiver: DerpClient) -> None:
            while not stop.is_set():
                try:
                    event = await receiver.recv(timeout=0.2)
                except TimeoutError:
                    continue
                if isinstance(event, RecvPacket) and self.counting:
                    self.delivered += 1
                    if self.delivered % 16 == 0:
                        (sent_at,) = STAMP.unpack_from(event.data)
                        self.latencies.append((time.monotonic() - sent_at) * 1000)

        await asyncio.gather(*(one(r) for r in self.receivers))

    async def measure(self) -> tuple[int, float]:
        """Packets delivered in WINDOW seconds, and their median latency in ms."""
        self.delivered, self.latencies, self.counting = 0, [], True
        await asyncio.sleep(WINDOW)  # the measurement window itself
        self.counting = False
        return self.delivered, statistics.median(self.latencies) if self.latencies else float("inf")


async def test_slow_never_and_mid_frame_readers_do_not_slow_others() -> None:
    with ClusterProcess(workers=1) as cluster:
        worker = cluster.worker_pids()[0]
        senders = [await DerpClient.connect(cluster.url) for _ in range(3)]
        receivers = [await DerpClient.connect(cluster.url) for _ in range(3)]
        sink = await DerpClient.connect(cluster.url)
        targets: list[bytes] = [sink.public_key]
        turn = [0]

        def side_target() -> bytes:
            turn[0] += 1
            return targets[turn[0] % len(targets)]

        work = Workload(senders, receivers, side_target)
        stop = asyncio.Event()
        sink_stop = asyncio.Event()
        tasks = [asyncio.create_task(work.send(stop)), asyncio.create_task(work.receive(stop)),
                 asyncio.create_task(Workload([], [sink], side_target).receive(sink_stop))]
        hostile: list[socket.socket] = []
        try:
            await asyncio.sleep(0.5)  # warm-up: let the pairs reach a steady rate before measuring
            base_count, base_latency = await work.measure()
            rss_before = rss_kib(worker)
            base_drops = cluster.varz()["worker"]["drops"]

            keys = [PrivateKey.generate() for _ in range(3)]
            hostile = [await raw_client(cluster.port, key) for key in keys]
            slow_stop = asyncio.Event()
            slow = asyncio.create_task(slow_reader(hostile[0], 10_000, slow_stop))
            targets[:] = [k.public().raw for k in keys]  # now the side traffic hits the hostile readers
            await stop_mid_frame(hostile[2])
            attack_count, attack_latency = await work.measure()
            rss_attack = rss_kib(worker)
            slow_stop.set()
            slow_read = await slow
            # the stalled readers are cut off by the 2 s write timeout; the others keep relaying
            await await_until(lambda: cluster.varz()["worker"]["write_timeouts"] >= 2, timeout=10,
                              what="write timeouts for the never-reader and the mid-frame reader")
            varz = cluster.varz()["worker"]
            drops = {k: v - base_drops.get(k, 0) for k, v in varz["drops"].items() if v - base_drops.get(k, 0)}
            report("slow / never / mid-frame readers", baseline_packets=base_count, attack_packets=attack_count,
                   throughput_ratio=round(attack_count / max(base_count, 1), 2),
                   baseline_p50_ms=round(base_latency, 2), attack_p50_ms=round(attack_latency, 2),
                   rss_before_kib=rss_before, rss_under_attack_kib=rss_attack, slow_reader_read_bytes=slow_read,
                   write_timeouts=varz["write_timeouts"], drops_during_attack=drops)
            assert attack_count >= THROUGHPUT_RATIO * base_count, (attack_count, base_count)
            assert attack_latency <= LATENCY_FACTOR * base_latency + LATENCY_SLACK_MS, (attack_latency, base_latency)
            assert rss_attack - rss_before < RSS_BOUND_MIB * 1024
        finally:
            stop.set()
            sink_stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sock in hostile:
                sock.close()
            for client in [*senders, *receivers, sink]:
                await client.close()


async def test_rss_bounded_while_flooding_100_mb_at_a_never_reader() -> None:
    with ClusterProcess(workers=1) as cluster:
        worker = cluster.worker_pids()[0]
        victim_key = PrivateKey.generate()
        victim = victim_key.public().raw
        flooder = await DerpClient.connect(cluster.url)
        a, b = await DerpClient.connect(cluster.url), await DerpClient.connect(cluster.url)
        stop = asyncio.Event()
        never_readers: list[socket.socket] = []
        samples: list[int] = []

        async def keep_a_never_reader_connected() -> None:
            # the write timeout drops a never-reader after 2 s: reconnect it (same key, again never
            # reading) so that the whole flood meets a live, stalled receiver
            while not stop.is_set():
                if cluster.varz()["worker"]["current_connections"] < 4:
                    with contextlib.suppress(OSError, AssertionError):
                        never_readers.append(await raw_client(cluster.port, victim_key))
                await asyncio.sleep(0.1)

        async def sample_rss() -> None:
            while not stop.is_set():
                samples.append(rss_kib(worker))
                await asyncio.sleep(0.05)

        probe_ok = 0

        async def probe() -> None:
            nonlocal probe_ok
            n = 0
            while not stop.is_set():
                n += 1
                await a.send(b.public_key, b"probe %d" % n)
                with contextlib.suppress(TimeoutError):
                    if isinstance(await b.recv(timeout=1), RecvPacket):
                        probe_ok += 1
                await asyncio.sleep(0.05)

        try:
            never_readers.append(await raw_client(cluster.port, victim_key))
            await asyncio.sleep(0.3)  # let the fresh worker's RSS settle before the baseline
            rss_before = rss_kib(worker)
            helpers = [asyncio.create_task(keep_a_never_reader_connected()), asyncio.create_task(sample_rss()),
                       asyncio.create_task(probe())]
            chunk = os.urandom(60_000)
            started = time.monotonic()
            sent = 0
            while sent < FLOOD_BYTES:
                for _ in range(17):
                    flooder.send_nowait(victim, chunk)
                    sent += len(chunk)
                await flooder.flush()
                # pacing (~1 MB per 30 ms): spread the flood over a few seconds so that it spans
                # write timeouts and never-reader reconnections, not one burst
                await asyncio.sleep(0.03)
            took = time.monotonic() - started
            await asyncio.sleep(0.5)  # the worker drains what it read; RSS sampling continues
            stop.set()
            await asyncio.gather(*helpers, return_exceptions=True)
            varz = cluster.varz()["worker"]
            peak = max(samples)
            report("100 MB at a never-reader", flood_mb=FLOOD_BYTES >> 20, flood_seconds=round(took, 2),
                   rss_before_kib=rss_before, rss_peak_kib=peak, rss_growth_mib=round((peak - rss_before) / 1024, 1),
                   never_reader_connections=len(never_readers), write_timeouts=varz["write_timeouts"],
                   drops=dict((k, v) for k, v in varz["drops"].items() if v), probe_packets_delivered=probe_ok,
                   rss_all_workers_kib=worker_rss_kib(cluster))
            assert peak - rss_before < RSS_BOUND_MIB * 1024, f"RSS grew {(peak - rss_before) / 1024:.0f} MiB"
            assert probe_ok > 0, "others kept relaying during the flood"
        finally:
            stop.set()
            for sock in never_readers:
                sock.close()
            for client in (flooder, a, b):
                with contextlib.suppress(DerpClientError, OSError):
                    await client.close()
