"""Claims of docs/SECURITY.md that need a running `cluster up` (or a live peer) to check: file modes
of the run dir and the admin sockets, the derper mesh key file left as the operator made it, the
WebSocket message size limit, SIGHUP to the supervisor reloading admission on every worker, and a
`--mesh-with` peering surviving a derper that sends ill-typed ServerInfo.

Everything runs on loopback; waits are deadlines (await_until, timeouts), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import struct
import time
from pathlib import Path

import pytest
import websockets
from nacl.public import Box
from nacl.public import PublicKey as NaclPublicKey

from mesh.derp_peering import DerpMeshPeer
from relay_worker import frames as F
from relay_worker.client import DerpClient, DerpClientError
from relay_worker.keys import PrivateKey
from tests.support import ClusterProcess, await_until, wait_until

pytestmark = pytest.mark.slow


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def _relays(src: DerpClient, dst: DerpClient, payload: bytes, timeout: float = 5.0) -> None:
    """src's packet reaches dst. Resent every 100 ms until the deadline, as a real client would: with
    several workers, dst's key reaches src's worker by gossip a few milliseconds after its handshake."""
    deadline = time.monotonic() + timeout
    while True:
        await src.send(dst.public_key, payload)
        try:
            got = await dst.recv_packet(timeout=0.1)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
            continue
        assert got.src == src.public_key
        if got.data == payload:
            return


# -- section 6: file modes ------------------------------------------------------------------------------


def test_run_dir_is_0700_and_admin_sockets_are_0600() -> None:
    cluster = ClusterProcess(workers=2)
    # an operator's pre-existing, too-open run dir is tightened at start
    cluster.run_dir.mkdir(mode=0o755)
    os.chmod(cluster.run_dir, 0o755)
    with cluster:
        assert _mode(cluster.run_dir) == 0o700
        assert cluster.run_dir.stat().st_uid == os.getuid()
        for index in range(cluster.workers):
            sock = cluster.run_dir / f"worker-{index}.sock"
            assert stat.S_ISSOCK(os.lstat(sock).st_mode), sock
            assert _mode(sock) == 0o600, f"{sock.name} is {_mode(sock):o}"
            assert cluster.varz(index)["worker"] is not None  # the socket is the live admin socket
        # nothing in the run dir is writable by group or others (ipc mesh sockets, supervisor.json)
        loose = {entry.name: oct(_mode(entry)) for entry in cluster.run_dir.iterdir() if _mode(entry) & 0o022}
        assert not loose, loose


async def test_derper_mesh_key_file_is_only_read(tmp_path: Path) -> None:
    """The worker reads the mesh key file and never writes, replaces, re-modes or adds beside it."""
    key_dir = tmp_path / "secrets"
    key_dir.mkdir()
    key_file = key_dir / "derp-mesh.key"
    mesh_key = os.urandom(32).hex()
    key_file.write_text(mesh_key + "\n")
    # read-only to its owner and nothing can be created beside it: the worker must not need more.
    # (root ignores these modes, so the check that counts is the stat comparison below.)
    os.chmod(key_file, 0o400)
    os.chmod(key_dir, 0o500)
    before = os.stat(key_file)
    try:
        with ClusterProcess("--mesh-key-file", str(key_file), "--max-clients", "1", workers=1) as cluster:
            regular = await DerpClient.connect(cluster.url)
            # the key was read: a prober presenting it is a mesh peer, exempt from --max-clients ...
            mesh = await DerpClient.connect(cluster.url, mesh_key=mesh_key, is_prober=True)
            try:
                # ... and one presenting another key is an ordinary client, refused at the limit
                with pytest.raises(DerpClientError):
                    await DerpClient.connect(cluster.url, mesh_key=os.urandom(32).hex(), is_prober=True, timeout=5)
            finally:
                await regular.close()
                await mesh.close()
        after = os.stat(key_file)
        for field in ("st_mode", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns", "st_uid", "st_nlink"):
            assert getattr(after, field) == getattr(before, field), field
        assert key_file.read_text() == mesh_key + "\n"
        assert [p.name for p in key_dir.iterdir()] == ["derp-mesh.key"]
    finally:
        os.chmod(key_dir, 0o700)


# -- section 7: WebSocket message size ------------------------------------------------------------------


def _send_packets(dst: bytes, count: int, fill: bytes) -> bytes:
    """`count` full-size SendPacket frames to dst as one byte string (one WebSocket message)."""
    return b"".join(F.build_send_packet(dst, fill * F.MAX_PACKET_SIZE) for _ in range(count))


async def test_websocket_message_over_1_mib_closes_only_that_connection() -> None:
    with ClusterProcess(workers=1) as cluster:
        c = await DerpClient.connect(cluster.url)
        d = await DerpClient.connect(cluster.url)
        w = await DerpClient.connect(cluster.url, websocket=True)
        try:
            await _relays(d, c, b"before")
            await await_until(lambda: cluster.varz()["worker"]["current_connections"] == 3, timeout=5,
                              what="three registered clients")

            # 15 full-size packets in one message (983,595 bytes): under the limit, all delivered
            under = _send_packets(c.public_key, 15, b"u")
            assert len(under) < 1 << 20
            await w.io.ws.send(under)
            for _ in range(15):
                got = await c.recv_packet(timeout=5)
                assert got.src == w.public_key and got.data == b"u" * F.MAX_PACKET_SIZE

            # 32 well-formed full-size packets in one 2 MiB message: only the message size is wrong,
            # so only the WebSocket limit can refuse it
            over = _send_packets(c.public_key, 32, b"o")
            assert len(over) > 2 << 20
            with contextlib.suppress(websockets.ConnectionClosed):
                await w.io.ws.send(over)
            with pytest.raises(DerpClientError):
                await w.recv(timeout=5)  # the server closed the connection
            assert w.io.ws.close_code == 1009, w.io.ws.close_code  # "message too big"
            await await_until(lambda: cluster.varz()["worker"]["current_connections"] == 2, timeout=5,
                              what="the WebSocket client to leave the relay")

            # nothing of the oversized message was relayed, and the others keep relaying
            await _relays(d, c, b"after")
            await _relays(c, d, b"and back")
        finally:
            for client in (c, d, w):
                await client.close()


# -- admission: SIGHUP to the supervisor ----------------------------------------------------------------


async def test_sighup_to_the_supervisor_reloads_the_allow_keys_file_on_every_worker(tmp_path: Path) -> None:
    first, second, stranger = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    allow = tmp_path / "allowed-keys"
    allow.write_text(f"nodekey:{first.public().raw.hex()}\n")
    with ClusterProcess("--allow-keys-file", str(allow), workers=2) as cluster:
        assert cluster.proc is not None
        pids = cluster.worker_pids()
        reloads = [doc["admission"]["allow_keys_reloads"] for doc in cluster.all_varz()]
        assert [doc["admission"]["allow_keys"] for doc in cluster.all_varz()] == [1, 1]

        # no handshake arrives, so no worker looks at the file by itself: only the signal reloads it
        allow.write_text(f"nodekey:{first.public().raw.hex()}\nnodekey:{second.public().raw.hex()}\n")
        os.kill(cluster.proc.pid, signal.SIGHUP)

        def reloaded() -> bool:
            docs = cluster.all_varz()
            return all(doc["admission"]["allow_keys"] == 2 and doc["admission"]["allow_keys_reloads"] > before
                       for doc, before in zip(docs, reloads, strict=True))

        await await_until(reloaded, timeout=10, what="every worker to reload the allow-keys file")
        assert cluster.worker_pids() == pids, "SIGHUP must not restart or kill workers"
        assert not cluster.exited()

        a = await DerpClient.connect(cluster.url, first)
        b = await DerpClient.connect(cluster.url, second)
        try:
            await _relays(a, b, b"admitted after the reload")
            with pytest.raises(DerpClientError):
                await DerpClient.connect(cluster.url, stranger, timeout=5)
        finally:
            await a.close()
            await b.close()


def test_sighup_to_the_supervisor_while_workers_start_does_not_kill_them() -> None:
    """A reload sent right after start (a config-management run, logrotate) must not stop the node.
    The supervisor forwards SIGHUP to every worker process at once; a worker only handles it from
    `worker_main` on, and until then SIGHUP's default action ends it."""
    cluster = ClusterProcess(workers=2)
    try:
        cluster.start(wait=False)
        assert cluster.proc is not None

        def worker_pids() -> list[int] | None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                pids = cluster.worker_pids()
                return pids if pids and all(pids) else None
            return None

        pids = wait_until(worker_pids, timeout=30, interval=0.005, what="the supervisor to start its workers")
        os.kill(cluster.proc.pid, signal.SIGHUP)
        wait_until(lambda: any("DERP cluster serving" in line for line in cluster.output) or cluster.exited(),
                   timeout=60, what="cluster up to start or exit")
        assert not cluster.exited(), "cluster up exited after a SIGHUP during start-up:\n" + cluster.log()
        assert cluster.worker_pids() == pids, "a worker died of the SIGHUP and was restarted"
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()
        cluster.tmp.cleanup()


# -- section 2: a derper we mesh with sends ServerInfo of the wrong shape -------------------------------


@pytest.mark.parametrize("bad_info", [b'{"version":"x"}', b'{"TokenBucketBytesBurst":1e999}', b"[" * 100_000],
                         ids=["string_version", "float_burst", "deeply_nested"])
async def test_mesh_peering_survives_ill_typed_server_info_and_reconnects(bad_info: bytes) -> None:
    """A loopback stand-in for a derper: its first connection answers ClientInfo with a ServerInfo box
    around `bad_info`, later ones behave and announce a client. The peering must log, back off,
    reconnect and carry on, not end for good."""
    server = PrivateKey.generate()
    announced = PrivateKey.generate().public().raw
    accepted = 0

    async def derper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        good = accepted > 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
                         + F.build_server_key(server.public().raw))
            frame_type, length = struct.unpack(">BI", await reader.readexactly(F.HEADER_LEN))
            assert frame_type == F.CLIENT_INFO
            client_public, _, _ = F.parse_client_info(await reader.readexactly(length))
            nonce = os.urandom(F.NONCE_LEN)
            info = b'{"version":2}' if good else bad_info
            sealed = Box(server.nacl(), NaclPublicKey(client_public)).encrypt(info, nonce).ciphertext
            writer.write(F.build_server_info(nonce, sealed))
            if good:
                writer.write(F.build_peer_present(announced))
            await reader.read()  # until the peer hangs up
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(derper, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    present: list[bytes] = []
    peer = DerpMeshPeer(f"http://127.0.0.1:{port}/derp", "ab" * 32, PrivateKey.generate(),
                        on_present=lambda key, _peer: present.append(key), on_gone=lambda key, _peer: None)
    peer.start()
    try:
        await await_until(lambda: peer.connected and announced in present, timeout=10,
                          what="the peering to reconnect after the bad ServerInfo")
        assert accepted >= 2
        assert "ServerInfo" in peer.last_error, peer.last_error
        assert peer.task is not None and not peer.task.done()
    finally:
        await peer.close()
        listener.close()
        await listener.wait_closed()
