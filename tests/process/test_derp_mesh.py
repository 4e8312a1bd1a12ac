"""Tailscale's own DERP mesh protocol: our node as a stock derper's mesh peer, and meshing with
derper-protocol servers through --mesh-with."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relay_worker import frames as F
from relay_worker.client import DerpClient, DerpClientError, PeerGone
from relay_worker.keys import PrivateKey
from tests import tailscale_client as tc
from tests.support import ClusterProcess, await_until, free_port

pytestmark = pytest.mark.slow
MESH_KEY = "5e" * 32


@pytest.fixture
def mesh_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "derp-mesh.key"
    path.write_text(MESH_KEY + "\n")
    return path


async def test_stock_derper_peer_watches_and_forwards(mesh_key_file: Path) -> None:
    """A client written to Tailscale's protocol (as derper's mesh client) against our 2-worker node."""
    with ClusterProcess("--mesh-key-file", str(mesh_key_file), workers=2) as node:
        clients = await asyncio.gather(*(DerpClient.connect(node.url) for _ in range(6)))
        peer = await tc.TailscaleDerpClient.connect("127.0.0.1", node.port, mesh_key=MESH_KEY, watch_conns=True)
        try:
            await await_until(lambda: all(d["directory"]["size"] == 7 for d in node.all_varz()), timeout=10,
                              what="directory sync")
            present: set[bytes] = set()
            want = {c.public_key for c in clients}
            while not want <= present:
                msg = await peer.recv(timeout=5)
                if isinstance(msg, tc.PeerPresent):
                    present.add(bytes(msg.key))
            # ForwardPacket from the mesh peer reaches every client, whichever worker holds it
            src = PrivateKey.generate().public().raw
            for client in clients:
                await peer.forward_packet(src, client.public_key, b"via derper mesh")
            for client in clients:
                got = await client.recv_packet(timeout=5)
                assert got.src == src and got.data == b"via derper mesh"
            # live PeerGone for a client that leaves
            await clients[0].close()
            while True:
                msg = await peer.recv(timeout=10)
                if isinstance(msg, tc.PeerGone) and bytes(msg.key) == clients[0].public_key:
                    break
        finally:
            await peer.close()
            for client in clients[1:]:
                await client.close()


@pytest.mark.parametrize("frame", ["watch", "forward", "close_peer"])
async def test_mesh_frames_without_the_mesh_key_end_the_connection(mesh_key_file: Path, frame: str) -> None:
    with ClusterProcess("--mesh-key-file", str(mesh_key_file), workers=1) as node:
        victim = await DerpClient.connect(node.url)
        intruder = await DerpClient.connect(node.url, mesh_key="00" * 32)
        try:
            if frame == "watch":
                await intruder.watch_conns()
            elif frame == "forward":
                await intruder.forward_packet(os.urandom(32), victim.public_key, b"sneaky")
            else:
                await intruder.close_peer(victim.public_key)
            with pytest.raises(DerpClientError):
                while True:
                    await intruder.recv(timeout=5)
            with pytest.raises(TimeoutError):
                await victim.recv_packet(timeout=1.0)
            assert node.varz()["worker"]["current_connections"] == 1  # the victim is still connected
        finally:
            await victim.close()


async def test_close_peer_with_the_mesh_key_closes_that_client(mesh_key_file: Path) -> None:
    with ClusterProcess("--mesh-key-file", str(mesh_key_file), workers=1) as node:
        victim = await DerpClient.connect(node.url)
        peer = await DerpClient.connect(node.url, mesh_key=MESH_KEY)
        try:
            await peer.close_peer(victim.public_key)
            with pytest.raises(DerpClientError):
                while True:
                    await victim.recv(timeout=5)
        finally:
            await peer.close()


async def test_mesh_with_derper_protocol_servers_both_ways(mesh_key_file: Path) -> None:
    """Two nodes that share no ZeroMQ mesh, only derper's protocol (each `--mesh-with` the other)."""
    port_x, port_y = free_port(), free_port()
    url_x, url_y = f"http://127.0.0.1:{port_x}/derp", f"http://127.0.0.1:{port_y}/derp"
    common = ["--mesh-key-file", str(mesh_key_file)]
    with ClusterProcess(*common, "--mesh-with", url_y, workers=2, port=port_x) as x, \
            ClusterProcess(*common, "--mesh-with", url_x, workers=2, port=port_y) as y:
        cx = await DerpClient.connect(x.url)
        cy = await DerpClient.connect(y.url)
        try:
            def meshed(node: ClusterProcess, key: bytes) -> bool:
                # one worker holds the node's derper connection; every worker knows its keys
                docs = [doc["mesh"] for doc in node.all_varz()]
                return (sum(doc["derper_holder"] for doc in docs) == 1
                        and all(doc["derper_keys"] for doc in docs))

            await await_until(lambda: meshed(x, cy.public_key) and meshed(y, cx.public_key), timeout=20,
                              what="each node to watch the other's clients")
            await cy.send(cx.public_key, b"y to x")
            got = await cx.recv_packet(timeout=5)
            assert got.src == cy.public_key and got.data == b"y to x"
            await cx.send(cy.public_key, b"x to y")
            got = await cy.recv_packet(timeout=5)
            assert got.src == cx.public_key and got.data == b"x to y"
            # when cy leaves y, x's client that received from it is told
            await cy.close()
            while True:
                event = await cx.recv(timeout=10)
                if isinstance(event, PeerGone):
                    assert event == PeerGone(cy.public_key, F.PEER_GONE_DISCONNECTED)
                    break
        finally:
            await cx.close()
            await cy.close()
