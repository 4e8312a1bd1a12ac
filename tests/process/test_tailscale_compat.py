"""A client written to Tailscale's protocol (tests/tailscale_client.py, independent of our code)
connects to `cluster up` and relays, in each transport Tailscale clients use."""

from __future__ import annotations

import os

import pytest

from tests import tailscale_client as tc
from tests.support import ClusterProcess

DISCO = b"TS\xf0\x9f\x92\xac" + os.urandom(32 + 24 + 16)


@pytest.mark.parametrize("mode", ["upgrade", "websocket", "fast_start_known_key"])
async def test_tailscale_protocol_client_relays(one_worker: ClusterProcess, mode: str) -> None:
    kwargs: dict[str, object] = {"websocket": mode == "websocket"}
    a = await tc.TailscaleDerpClient.connect("127.0.0.1", one_worker.port, **kwargs)  # type: ignore[arg-type]
    if mode == "fast_start_known_key":
        # Go sends the request and ClientInfo in one write when it already knows the server key.
        kwargs = {"fast_start": True, "server_public_key": a.server_public_key, "wait_server_info": False}
    b = await tc.TailscaleDerpClient.connect("127.0.0.1", one_worker.port, **kwargs)  # type: ignore[arg-type]
    try:
        if mode == "fast_start_known_key":
            # b did not wait for ServerInfo; only once it arrives is b registered and reachable
            assert isinstance(await b.recv(timeout=5), tc.ServerInfo)
        assert await a.send_packet(b.public_key, b"hello from a")
        msg = await b.recv(timeout=5)
        while isinstance(msg, tc.ServerInfo | tc.KeepAlive):
            msg = await b.recv(timeout=5)
        assert msg == tc.RecvPacket(bytes(a.public_key), b"hello from a")
        assert await b.send_packet(a.public_key, DISCO)
        msg = await a.recv(timeout=5)
        while isinstance(msg, tc.ServerInfo | tc.KeepAlive):
            msg = await a.recv(timeout=5)
        assert msg == tc.RecvPacket(bytes(b.public_key), DISCO)
    finally:
        await a.close()
        await b.close()


async def test_tailscale_protocol_client_ping_and_peer_gone(one_worker: ClusterProcess) -> None:
    a = await tc.TailscaleDerpClient.connect("127.0.0.1", one_worker.port)
    b = await tc.TailscaleDerpClient.connect("127.0.0.1", one_worker.port)
    try:
        await a.send_ping(b"abcdefgh")
        msg = await a.recv(timeout=5)
        while not isinstance(msg, tc.Pong):
            msg = await a.recv(timeout=5)
        assert msg.data == b"abcdefgh"
        await a.send_packet(b.public_key, b"x")
        while not isinstance(await b.recv(timeout=5), tc.RecvPacket):
            pass
        await a.close()
        msg = await b.recv(timeout=5)
        while isinstance(msg, tc.KeepAlive):
            msg = await b.recv(timeout=5)
        assert msg == tc.PeerGone(bytes(a.public_key), tc.PEER_GONE_DISCONNECTED)
    finally:
        await b.close()
