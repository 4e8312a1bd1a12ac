"""Hostile reads through the compiled relay loop (relay_worker/_fastpath.c), on a real 2-worker node.

The loop takes runs of SendPackets out of a read, for clients of the same worker and for keys the
other worker owns, before Python sees the rest. These attacks mix what it takes with what it must
leave alone in one write and check, against the workers themselves, that:

- a bad frame after good packets closes the sender, the packets before it reach both the local and
  the cross-worker receiver, and nothing after it is relayed;
- a frame length past the limit closes the sender at once;
- a flood of maximum-size packets at a cross-worker receiver that never reads costs the workers a
  bounded amount of memory, the receiver is dropped by the write deadline, and the sender stays;
- after all of it, both workers relay for fresh clients.
"""

from __future__ import annotations

import asyncio

import pytest

from relay_worker import fastpath
from relay_worker import frames as F
from tests.faults.conftest import report, worker_rss_kib
from tests.support import ClusterProcess, RawConn, await_until

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="relay_worker._fastpath not built")

FLOOD = 2000  # maximum-size packets: 128 MiB offered to a receiver that never reads
MAX_PACKET = b"f" * F.MAX_PACKET_SIZE


def accepts(cluster: ClusterProcess) -> list[int]:
    return [doc["worker"]["accepts"] for doc in cluster.all_varz()]


async def open_on(cluster: ClusterProcess, worker: int, *, rcvbuf: int = 1 << 20) -> RawConn:
    """A client on the given worker: connect one at a time until the kernel's hash puts one there."""
    for _ in range(64):
        before = accepts(cluster)
        conn = await RawConn.open(cluster.port, rcvbuf=rcvbuf)
        grew = [i for i, (a, b) in enumerate(zip(before, accepts(cluster), strict=True)) if b > a]
        if grew == [worker]:
            return conn
        conn.close()
    raise AssertionError(f"no connection landed on worker {worker} in 64 tries")


def packets(frames: list[tuple[int, bytes]]) -> list[bytes]:
    return [payload[32:] for frame_type, payload in frames if frame_type == F.RECV_PACKET]


def closed(conn: RawConn) -> bool:
    try:
        return conn.sock.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def relays(cluster: ClusterProcess, a: int, b: int) -> None:
    sender, receiver = await open_on(cluster, a), await open_on(cluster, b)
    try:
        await sender.send(F.build_send_packet(receiver.public, b"still relaying"))
        got = await receiver.read_until(lambda frames: packets(frames), 5)
        assert packets(got) == [b"still relaying"], (a, b, got)
    finally:
        sender.close()
        receiver.close()


async def test_a_bad_frame_after_packets_for_both_workers_stops_the_read_there() -> None:
    with ClusterProcess(workers=2) as cluster:
        await await_until(lambda: all(doc["mesh"]["peers_alive"] == 1 for doc in cluster.all_varz()), timeout=30,
                          what="both workers to see each other")
        sender, local, remote = await open_on(cluster, 0), await open_on(cluster, 0), await open_on(cluster, 1)
        errors = cluster.total("protocol_errors")
        write = b"".join([
            F.build_send_packet(local.public, b"before, same worker"),
            F.build_send_packet(remote.public, b"before, other worker"),
            F.build_frame(F.SEND_PACKET, bytes(3)),  # shorter than a key: a protocol error
            F.build_send_packet(local.public, b"after"),
            F.build_send_packet(remote.public, b"after"),
        ])
        await sender.send(write)
        got_local = await local.read_until(lambda frames: packets(frames), 5)
        got_remote = await remote.read_until(lambda frames: packets(frames), 5)
        assert packets(got_local) == [b"before, same worker"]
        assert packets(got_remote) == [b"before, other worker"]
        await await_until(lambda: closed(sender), timeout=5, what="the sender to be closed")
        assert cluster.total("protocol_errors") == errors + 1
        # nothing after the bad frame arrives later either
        assert packets(await local.read_until(lambda frames: len(packets(frames)) > 1, 1)) == [b"before, same worker"]
        assert packets(await remote.read_until(lambda frames: len(packets(frames)) > 1, 1)) == [b"before, other worker"]

        # a length past the limit, after a packet, in one write: closed as soon as the header arrives
        sender = await open_on(cluster, 1)
        await sender.send(F.build_send_packet(local.public, b"x") + F.frame_header(F.SEND_PACKET, F.MAX_FRAME_LEN + 1))
        await await_until(lambda: closed(sender), timeout=5, what="the oversized sender to be closed")
        for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)):
            await relays(cluster, a, b)
        assert not cluster.exited()


async def test_a_cross_worker_flood_at_a_never_reader_is_bounded_and_drops_only_the_reader() -> None:
    with ClusterProcess(workers=2) as cluster:
        await await_until(lambda: all(doc["mesh"]["peers_alive"] == 1 for doc in cluster.all_varz()), timeout=30,
                          what="both workers to see each other")
        before = worker_rss_kib(cluster)
        sender = await open_on(cluster, 0)
        reader = await open_on(cluster, 1, rcvbuf=4096)  # never reads from here on
        frame = F.build_send_packet(reader.public, MAX_PACKET)
        loop = asyncio.get_running_loop()
        for _ in range(FLOOD // 50):
            await asyncio.wait_for(loop.sock_sendall(sender.sock, frame * 50), 30)
        await await_until(lambda: closed(reader), timeout=15, what="the never-reader to be dropped")
        grown = [after - kib for after, kib in zip(worker_rss_kib(cluster), before, strict=True)]
        report("compiled_loop_cross_worker_flood", offered_mib=FLOOD * len(MAX_PACKET) >> 20, rss_growth_kib=grown,
               write_timeouts=cluster.total("write_timeouts"), forwarded=cluster.total("packets_forwarded_out"))
        # the reader's queue is bounded (32 packets), the mesh batch by its byte cap: far below the flood
        assert max(grown) < 64 * 1024, grown
        assert not closed(sender), "the sender was dropped with the never-reader"
        for a, b in ((0, 1), (1, 0)):
            await relays(cluster, a, b)
        sender.close()
        reader.close()
