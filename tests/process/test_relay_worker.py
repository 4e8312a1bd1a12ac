"""Real `cluster up --workers 1` on loopback; clients speak DERP to it over real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from relay_worker import frames as F
from relay_worker.client import DerpClient, DerpClientError, PeerGone, Pong, RecvPacket
from relay_worker.keys import PrivateKey
from tests.support import ClusterProcess, await_until

DISCO = F.DISCO_MAGIC + os.urandom(32 + 24 + 10)


async def pair(url: str, **kwargs: object) -> tuple[DerpClient, DerpClient]:
    a = await DerpClient.connect(url, **kwargs)  # type: ignore[arg-type]
    b = await DerpClient.connect(url, **kwargs)  # type: ignore[arg-type]
    return a, b


async def expect_packet(client: DerpClient, src: bytes, data: bytes, timeout: float = 5.0) -> None:
    got = await client.recv_packet(timeout)
    assert got == RecvPacket(src, data)


@pytest.mark.parametrize("mode", ["upgrade", "fast_start", "websocket"])
async def test_two_clients_relay_both_ways(one_worker: ClusterProcess, mode: str) -> None:
    kwargs = {"fast_start": mode == "fast_start", "websocket": mode == "websocket"}
    a, b = await pair(one_worker.url, **kwargs)
    try:
        assert a.server_info is not None and a.server_info.version == 2
        for i in range(20):
            await a.send(b.public_key, b"a->b %d" % i)
            await b.send(a.public_key, b"b->a %d" % i)
        for i in range(20):
            await expect_packet(b, a.public_key, b"a->b %d" % i)
            await expect_packet(a, b.public_key, b"b->a %d" % i)
    finally:
        await a.close()
        await b.close()


async def test_upgrade_response_headers_name_server_key(one_worker: ClusterProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", one_worker.port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    assert headers["upgrade"] == "DERP" and headers["derp-version"] == "2"
    frame = await asyncio.wait_for(reader.readexactly(5 + 40), 5)
    assert frame[0] == F.SERVER_KEY and frame[5:13] == F.MAGIC
    assert headers["derp-public-key"] == frame[13:45].hex()
    writer.close()


async def test_max_packet_passes_and_one_more_byte_is_refused(one_worker: ClusterProcess) -> None:
    a, b = await pair(one_worker.url)
    try:
        big = os.urandom(F.MAX_PACKET_SIZE)
        await a.send(b.public_key, big)
        await expect_packet(b, a.public_key, big)
        too_big = F.frame_header(F.SEND_PACKET, 32 + F.MAX_PACKET_SIZE + 1) + b.public_key + big + b"x"
        await a.send_raw(too_big)
        with pytest.raises(DerpClientError):
            await a.recv(timeout=5)
        # the worker keeps serving b
        c = await DerpClient.connect(one_worker.url)
        await c.send(b.public_key, b"still here")
        await expect_packet(b, c.public_key, b"still here")
        await c.close()
    finally:
        await a.close()
        await b.close()


async def test_ping_pong(one_worker: ClusterProcess) -> None:
    async with await DerpClient.connect(one_worker.url) as client:
        await client.ping(b"12345678")
        event = await client.recv(timeout=5)
        while not isinstance(event, Pong):
            event = await client.recv(timeout=5)
        assert event.data == b"12345678"


async def test_peer_gone_not_here_only_for_disco(one_worker: ClusterProcess) -> None:
    async with await DerpClient.connect(one_worker.url) as client:
        nobody = PrivateKey.generate().public().raw
        await client.send(nobody, b"not a disco packet")
        await client.send(nobody, DISCO)
        event = await client.recv(timeout=5)
        # the non-disco packet produced nothing; the first frame is the disco packet's PeerGone
        assert event == PeerGone(nobody, F.PEER_GONE_NOT_HERE)
        await client.ping(b"pingpong")
        while not isinstance(event := await client.recv(timeout=5), Pong):
            assert not isinstance(event, PeerGone), "no PeerGone for the non-disco packet"


async def test_peer_gone_not_here_is_rate_limited(one_worker: ClusterProcess) -> None:
    async with await DerpClient.connect(one_worker.url) as client:
        nobody = PrivateKey.generate().public().raw
        for _ in range(50):
            client.send_nowait(nobody, DISCO)
        await client.ping(b"ratelimt")
        gone = 0
        while not isinstance(event := await client.recv(timeout=5), Pong):
            gone += isinstance(event, PeerGone)
        assert 1 <= gone <= 5


async def test_peer_gone_disconnected_goes_to_receivers_only(one_worker: ClusterProcess) -> None:
    a = await DerpClient.connect(one_worker.url)
    receiver = await DerpClient.connect(one_worker.url)
    sender_to_a = await DerpClient.connect(one_worker.url)
    try:
        await a.send(receiver.public_key, b"hello")
        await expect_packet(receiver, a.public_key, b"hello")
        await sender_to_a.send(a.public_key, b"to a")
        await expect_packet(a, sender_to_a.public_key, b"to a")
        await a.close()
        event = await receiver.recv(timeout=5)
        assert event == PeerGone(a.public_key, F.PEER_GONE_DISCONNECTED)
        await sender_to_a.ping(b"pingpong")
        while not isinstance(event := await sender_to_a.recv(timeout=5), Pong):
            assert not isinstance(event, PeerGone), "a client that only sent to A is not told"
    finally:
        await receiver.close()
        await sender_to_a.close()


async def test_never_reader_does_not_slow_others_and_its_queue_is_bounded(one_worker: ClusterProcess) -> None:
    # A raw socket with a tiny receive buffer that completes the handshake and then never reads.
    stuck = await DerpClient.connect(one_worker.url)
    stuck_sock = stuck.io.writer.get_extra_info("socket")  # type: ignore[union-attr]
    stuck_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.io.writer.transport.pause_reading()  # type: ignore[union-attr]
    flooder, b, c = await DerpClient.connect(one_worker.url), await DerpClient.connect(one_worker.url), \
        await DerpClient.connect(one_worker.url)
    try:
        before = one_worker.varz()["worker"]["drops"]["queue_head"]
        payload = os.urandom(1200)
        for round_ in range(20):
            for _ in range(200):
                flooder.send_nowait(stuck.public_key, payload)
            await flooder.flush()
            await b.send(c.public_key, b"round %d" % round_)
            await expect_packet(c, b.public_key, b"round %d" % round_, timeout=2)
        await await_until(lambda: one_worker.varz()["worker"]["drops"]["queue_head"] > before, timeout=10,
                          what="queue_head drops for the never-reader")
        # the stuck client is dropped by the write timeout, and others still relay
        await await_until(lambda: one_worker.varz()["worker"]["write_timeouts"] >= 1, timeout=10,
                          what="write timeout of the never-reader")
        await b.send(c.public_key, b"after")
        await expect_packet(c, b.public_key, b"after")
    finally:
        for client in (stuck, flooder, b, c):
            await client.close()


async def _raw_upgraded(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n")
    await asyncio.wait_for(reader.readexactly(45), 5)  # ServerKey
    return reader, writer


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        while await asyncio.wait_for(reader.read(65536), 5):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize(
    "attack",
    [
        "bad_box",
        "truncated_frame_then_close",
        "two_gib_length",
        "garbage_before_handshake",
        "send_before_client_info",
    ],
)
async def test_hostile_input_closes_only_that_connection(one_worker: ClusterProcess, attack: str) -> None:
    a, b = await pair(one_worker.url)
    try:
        reader, writer = await _raw_upgraded(one_worker.port)
        if attack == "bad_box":
            writer.write(F.build_client_info(os.urandom(32), os.urandom(24), os.urandom(80)))
        elif attack == "truncated_frame_then_close":
            writer.write(F.frame_header(F.CLIENT_INFO, 500) + b"x" * 100)
            writer.write_eof()
        elif attack == "two_gib_length":
            writer.write(struct.pack(">BI", F.CLIENT_INFO, 2 << 30))
        elif attack == "garbage_before_handshake":
            writer.write(b"\x00garbage that is not a frame at all" * 10)
        else:
            writer.write(F.build_send_packet(b.public_key, b"sneaky"))
        await writer.drain()
        assert await _closed_by_server(reader)
        writer.close()
        await a.send(b.public_key, b"unaffected")
        await expect_packet(b, a.public_key, b"unaffected")
    finally:
        await a.close()
        await b.close()


async def test_unknown_frame_types_are_skipped(one_worker: ClusterProcess) -> None:
    a, b = await pair(one_worker.url)
    try:
        await a.send_raw(F.build_frame(0x7E, b"from the future") + F.build_frame(0x30, b""))
        await a.send(b.public_key, b"after unknown")
        await expect_packet(b, a.public_key, b"after unknown")
    finally:
        await a.close()
        await b.close()


async def test_duplicate_key_newest_wins_and_preferred_breaks_ties(one_worker: ClusterProcess) -> None:
    key = PrivateKey.generate()
    first = await DerpClient.connect(one_worker.url, key)
    sender = await DerpClient.connect(one_worker.url)
    try:
        await first.note_preferred(True)
        second = await DerpClient.connect(one_worker.url, key)
        # newest connection is active
        await sender.send(key.public().raw, b"to newest")
        await expect_packet(second, sender.public_key, b"to newest")
        # like derper, no Health frame tells the older one it is not active (D5): the next frame
        # it gets is the answer to its ping
        await first.ping(b"nohealth")
        event = await first.recv(timeout=5)
        assert isinstance(event, Pong) and event.data == b"nohealth", event
        # NotePreferred makes the other connection active again
        await first.note_preferred(True)
        await first.ping(b"syncsync")
        while not isinstance(await first.recv(timeout=5), Pong):
            pass
        await sender.send(key.public().raw, b"to preferred")
        await expect_packet(first, sender.public_key, b"to preferred")
        await second.close()
    finally:
        await first.close()
        await sender.close()


async def test_handshake_timeout_closes_silent_connection() -> None:
    with ClusterProcess("--handshake-timeout", "0.5") as cluster:
        reader, writer = await _raw_upgraded(cluster.port)
        assert await _closed_by_server(reader)
        writer.close()
        assert cluster.varz()["worker"]["handshake_timeouts"] == 1
