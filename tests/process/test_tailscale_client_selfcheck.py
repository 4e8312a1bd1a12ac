"""Self-checks of tests/tailscale_client.py: its wire helpers against hand-made bytes, and its connect
flow against a tiny in-test fake DERP peer (no project code involved)."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from nacl.public import Box, PrivateKey, PublicKey

try:  # tests/ as a package (tests/__init__.py) or as a plain rootdir on sys.path
    from tests import tailscale_client as tc
except ImportError:
    import tailscale_client as tc

K1 = bytes(range(32))
MESH = "ab" * 32


def test_constants_match_derp_go():
    assert tc.MAGIC == "DERP🔑".encode() == bytes.fromhex("44455250f09f9491")
    got = [tc.SERVER_KEY, tc.CLIENT_INFO, tc.SERVER_INFO, tc.SEND_PACKET, tc.RECV_PACKET, tc.KEEP_ALIVE,
           tc.NOTE_PREFERRED, tc.PEER_GONE, tc.PEER_PRESENT, tc.FORWARD_PACKET,
           tc.WATCH_CONNS, tc.CLOSE_PEER, tc.PING, tc.PONG, tc.HEALTH, tc.RESTARTING]
    assert got == [*range(1, 11), *range(0x10, 0x16)]
    assert tc.MAX_PACKET_SIZE == 65536 and tc.MAX_INFO_LEN == 1 << 20 and tc.PROTOCOL_VERSION == 2


def test_frame_header_layout():
    assert tc.frame(tc.SEND_PACKET, K1 + b"hi") == b"\x04\x00\x00\x00\x22" + K1 + b"hi"
    assert tc.frame(tc.WATCH_CONNS) == b"\x10\x00\x00\x00\x00"
    assert tc.parse_frame_header(b"\x05\x00\x01\x00\x00") == (5, 65536)


def test_upgrade_request_is_go_request_write():
    assert tc.build_upgrade_request("derp.example:3340") == (
        b"GET /derp HTTP/1.1\r\nHost: derp.example:3340\r\nUser-Agent: Go-http-client/1.1\r\n"
        b"Connection: Upgrade\r\nUpgrade: DERP\r\n\r\n"
    )
    fast = tc.build_upgrade_request("h", fast_start=True, ideal_node="901a")
    assert fast.split(b"\r\n")[3:7] == [b"Connection: Upgrade", b"Derp-Fast-Start: 1", b"Ideal-Node: 901a",
                                        b"Upgrade: DERP"]


def test_parse_server_key():
    assert tc.parse_server_key(tc.MAGIC + K1) == K1
    assert tc.parse_server_key(tc.MAGIC + K1 + b"future use") == K1  # extra bytes ignored
    for bad in (tc.MAGIC + K1[:31], b"DERP\x00\x00\x00\x00" + K1, b""):
        with pytest.raises(tc.DerpProtocolError):
            tc.parse_server_key(bad)


def test_client_info_json_matches_go_marshal():
    assert tc.client_info_json() == b'{"version":2,"CanAckPings":true}'
    assert tc.client_info_json(can_ack_pings=False) == b'{"version":2,"CanAckPings":false}'
    assert tc.client_info_json(is_prober=True) == b'{"version":2,"CanAckPings":true,"IsProber":true}'
    assert tc.client_info_json(mesh_key=" " + MESH.upper() + "\n", can_ack_pings=False) == (
        b'{"meshKey":"' + MESH.encode() + b'","version":2,"CanAckPings":false}'
    )
    for bad in ("ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(ValueError):
            tc.client_info_json(mesh_key=bad)


def test_client_info_payload_layout_opens_on_server():
    server, client = PrivateKey.generate(), PrivateKey.generate()
    js = tc.client_info_json()
    nonce = bytes(range(24))
    payload = tc.build_client_info(client, bytes(server.public_key), js, nonce)
    assert payload[:32] == bytes(client.public_key) and payload[32:56] == nonce
    assert len(payload) == 32 + 24 + 16 + len(js)
    assert Box(server, PublicKey(payload[:32])).decrypt(payload[32:]) == js


def test_open_server_info():
    server, client = PrivateKey.generate(), PrivateKey.generate()
    sealed = tc.seal(server, bytes(client.public_key), b'{"version":2}')
    assert tc.open_server_info(client, bytes(server.public_key), sealed) == {"version": 2}
    with pytest.raises(tc.DerpProtocolError):
        tc.open_server_info(client, bytes(server.public_key), sealed[:10])
    with pytest.raises(tc.DerpProtocolError):
        tc.open_server_info(client, bytes(PrivateKey.generate().public_key), sealed)


def test_parse_message_like_derp_client_recv():
    P = tc.parse_message
    assert P(tc.RECV_PACKET, K1 + b"data") == tc.RecvPacket(K1, b"data")
    assert P(tc.RECV_PACKET, K1) == tc.RecvPacket(K1, b"")
    assert P(tc.PEER_GONE, K1 + b"\x01") == tc.PeerGone(K1, tc.PEER_GONE_NOT_HERE)
    assert P(tc.PEER_GONE, K1) == tc.PeerGone(K1, tc.PEER_GONE_DISCONNECTED)  # old servers: no reason
    v4 = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
    assert P(tc.PEER_PRESENT, K1 + v4 + b"\x0d\x3d" + b"\x09") == tc.PeerPresent(K1, ("192.0.2.7", 3389), 9)
    assert P(tc.PEER_PRESENT, K1 + v4 + b"\x0d\x3d") == tc.PeerPresent(K1, ("192.0.2.7", 3389), None)
    assert P(tc.PEER_PRESENT, K1 + b"short") == tc.PeerPresent(K1)
    assert P(tc.KEEP_ALIVE, b"") == tc.KeepAlive()
    assert P(tc.PING, b"12345678xx") == tc.Ping(b"12345678")
    assert P(tc.PONG, b"12345678") == tc.Pong(b"12345678")
    assert P(tc.HEALTH, "dup 🔑".encode()) == tc.Health("dup 🔑")
    assert P(tc.HEALTH, b"") == tc.Health("")
    assert P(tc.RESTARTING, struct.pack(">II", 1500, 20000)) == tc.Restarting(1500, 20000)
    for ftype, short in [(tc.RECV_PACKET, K1[:5]), (tc.PEER_GONE, K1[:31]), (tc.PING, b"1234567"),
                         (tc.RESTARTING, b"1234"), (tc.SERVER_KEY, tc.MAGIC + K1), (0x7F, b"x")]:
        assert P(ftype, short) is None


# ---- connect flow against an in-test fake peer ----

async def _fake_session(stream, server: PrivateKey, seen: dict) -> None:
    async def read() -> tuple[int, bytes]:
        t, n = tc.parse_frame_header(await stream.read_exactly(5))
        return t, await stream.read_exactly(n)

    await stream.write(tc.frame(tc.SERVER_KEY, tc.MAGIC + bytes(server.public_key) + b"extra"))
    t, payload = await read()
    assert t == tc.CLIENT_INFO
    pub = payload[:32]
    seen["info"] = json.loads(Box(server, PublicKey(pub)).decrypt(payload[32:]))
    await stream.write(tc.frame(tc.SERVER_INFO, tc.seal(server, pub, b'{"version":2}')))
    with pytest.raises(tc.DerpConnectionClosed):
        while True:
            t, payload = await read()
            seen.setdefault("types", []).append(t)
            if t == tc.SEND_PACKET:
                await stream.write(tc.frame(tc.RECV_PACKET, pub + payload[32:]))
            elif t == tc.PING:
                await stream.write(tc.frame(tc.PONG, payload[:8]))


async def _roundtrip(client) -> None:
    assert client.server_info == {"version": 2}
    assert await client.send_packet(client.public_key, b"hello")
    assert await client.recv(timeout=5) == tc.RecvPacket(client.public_key, b"hello")
    await client.send_ping(b"abcdefgh")
    assert await client.recv(timeout=5) == tc.Pong(b"abcdefgh")
    await client.close()


@pytest.mark.parametrize("fast", [False, True])
async def test_connect_over_http(fast):
    server, seen, done = PrivateKey.generate(), {}, asyncio.Event()

    async def handle(reader, writer):
        seen["request"] = await reader.readuntil(b"\r\n\r\n")
        if b"Derp-Fast-Start: 1" not in seen["request"]:
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                         b"Derp-Version: 2\r\nDerp-Public-Key: " + bytes(server.public_key).hex().encode() +
                         b"\r\n\r\n")
        await _fake_session(tc._TCPStream(reader, writer), server, seen)
        done.set()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        key = bytes(server.public_key) if fast else None
        c = await tc.connect("127.0.0.1", port, fast_start=fast, server_public_key=key, preferred=True)
        assert c.server_public_key == bytes(server.public_key)
        assert c.response_headers.get("derp-version") == (None if fast else "2")
        await _roundtrip(c)
        await asyncio.wait_for(done.wait(), 5)
    assert seen["request"].startswith(f"GET /derp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    assert seen["info"] == {"version": 2, "CanAckPings": True}
    assert seen["types"][:3] == [tc.NOTE_PREFERRED, tc.SEND_PACKET, tc.PING]


async def test_connect_over_websocket():
    from websockets.asyncio.server import serve

    server, seen, done = PrivateKey.generate(), {}, asyncio.Event()

    async def handle(ws):
        seen["subprotocol"] = ws.subprotocol
        await _fake_session(tc._WSStream(ws), server, seen)
        done.set()

    async with serve(handle, "127.0.0.1", 0, subprotocols=["derp"]) as srv:
        port = srv.sockets[0].getsockname()[1]
        c = await tc.connect("127.0.0.1", port, websocket=True, mesh_key=MESH, can_ack_pings=False)
        assert c.subprotocol == "derp"
        await _roundtrip(c)
        await asyncio.wait_for(done.wait(), 5)
    assert seen["subprotocol"] == "derp"
    assert seen["info"] == {"meshKey": MESH, "version": 2, "CanAckPings": False}


async def test_non_101_is_an_error():
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 33\r\n\r\n"
                     b"DERP requires connection upgrade\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with srv:
        with pytest.raises(tc.DerpProtocolError, match="426"):
            await tc.connect("127.0.0.1", srv.sockets[0].getsockname()[1], timeout=5)
