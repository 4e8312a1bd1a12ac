"""Cross-worker semantics equal single-worker semantics: duplicates, PeerGone, WatchConns, status."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request

import pytest

from relay_worker import frames as F
from relay_worker.client import DerpClient, Health, PeerGone, Pong
from relay_worker.keys import PrivateKey
from tests.support import ClusterProcess, await_until

pytestmark = pytest.mark.slow

MESH_KEY = "ab" * 32


def worker_of_new_connection(cluster: ClusterProcess, before: list[int]) -> int:
    after = [doc["worker"]["current_connections"] for doc in cluster.all_varz()]
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a]
    assert len(changed) == 1, (before, after)
    return changed[0]


async def connect_on(cluster: ClusterProcess, worker: int, key: PrivateKey | None = None,
                     **kwargs: object) -> DerpClient:
    """Connect until the kernel's SO_REUSEPORT choice lands the client on the wanted worker."""
    for _ in range(60):
        before = [doc["worker"]["current_connections"] for doc in cluster.all_varz()]
        client = await DerpClient.connect(cluster.url, key, **kwargs)  # type: ignore[arg-type]
        if worker_of_new_connection(cluster, before) == worker:
            return client
        await client.close()
        await await_until(lambda want=before: [d["worker"]["current_connections"] for d in cluster.all_varz()] == want,
                          timeout=5, what="the extra connection to close")
    raise AssertionError(f"could not land a connection on worker {worker}")


async def sync(client: DerpClient) -> None:
    """Round-trip a ping so every frame sent before it has been processed by the server."""
    await client.ping(b"syncsync")
    while not isinstance(await client.recv(timeout=5), Pong):
        pass


def keys_everywhere(cluster: ClusterProcess, n: int) -> bool:
    return all(doc["directory"]["size"] == n for doc in cluster.all_varz())


async def test_duplicate_key_on_two_workers_newest_wins_and_preferred_breaks_ties() -> None:
    with ClusterProcess(workers=2) as cluster:
        key = PrivateKey.generate()
        sender = await connect_on(cluster, 0)
        first = await connect_on(cluster, 0, key)
        await await_until(lambda: keys_everywhere(cluster, 2), what="directory sync")
        second = await connect_on(cluster, 1, key)
        try:
            await await_until(lambda: cluster.varz(0)["mesh"]["peers_alive"] == 1, what="mesh up")

            async def delivered_to(target: DerpClient, other: DerpClient, tag: bytes) -> None:
                for attempt in range(100):
                    await sender.send(key.public().raw, tag + b"%d" % attempt)
                    try:
                        got = await target.recv_packet(timeout=0.2)
                        assert got.src == sender.public_key
                        return
                    except TimeoutError:
                        continue
                raise AssertionError(f"{tag!r} never reached the expected connection")

            # the newest connection (on worker 1) receives, though the sender shares worker 0 with the older
            await delivered_to(second, first, b"newest")
            # NotePreferred on the older connection makes it win
            await first.note_preferred(True)
            await delivered_to(first, second, b"preferred")
        finally:
            for client in (sender, first, second):
                await client.close()


async def test_peer_gone_disconnected_across_workers_and_not_here() -> None:
    with ClusterProcess(workers=2) as cluster:
        a = await connect_on(cluster, 0)
        b = await connect_on(cluster, 1)
        try:
            await await_until(lambda: keys_everywhere(cluster, 2), what="directory sync")
            await a.send(b.public_key, b"hello across")
            got = await b.recv_packet(timeout=5)
            assert got.src == a.public_key and got.data == b"hello across"
            await b.send(a.public_key, F.DISCO_MAGIC + os.urandom(64))
            assert (await a.recv_packet(timeout=5)).src == b.public_key
            await a.close()
            event = await b.recv(timeout=10)
            while not isinstance(event, PeerGone):
                event = await b.recv(timeout=10)
            assert event == PeerGone(a.public_key, F.PEER_GONE_DISCONNECTED)
            await b.send(a.public_key, F.DISCO_MAGIC + os.urandom(64))
            event = await b.recv(timeout=5)
            assert event == PeerGone(a.public_key, F.PEER_GONE_NOT_HERE)
        finally:
            await b.close()


async def test_watch_conns_sees_every_client_of_the_node(tmp_path: object) -> None:
    key_file = os.path.join(str(tmp_path), "meshkey")
    with open(key_file, "w") as fh:
        fh.write(MESH_KEY + "\n")
    with ClusterProcess("--mesh-key-file", key_file, workers=2) as cluster:
        a = await connect_on(cluster, 0)
        b = await connect_on(cluster, 1)
        watcher = await DerpClient.connect(cluster.url, mesh_key=MESH_KEY)
        try:
            await await_until(lambda: keys_everywhere(cluster, 3), what="directory sync")
            await watcher.watch_conns()
            present: set[bytes] = set()
            while not {a.public_key, b.public_key} <= present:
                event = await watcher.recv(timeout=5)
                if isinstance(event, F.PeerPresent):
                    present.add(event.key)
            late = await connect_on(cluster, 1)
            while True:
                event = await watcher.recv(timeout=10)
                if isinstance(event, F.PeerPresent) and event.key == late.public_key:
                    break
            await late.close()
            while True:
                event = await watcher.recv(timeout=10)
                if isinstance(event, PeerGone) and event.key == late.public_key:
                    break
            # WatchConns without the mesh key ends that connection
            intruder = await DerpClient.connect(cluster.url, mesh_key="cd" * 32)
            await intruder.watch_conns()
            with pytest.raises(Exception):  # noqa: B017 - closed connection, whichever error surfaces
                while True:
                    await intruder.recv(timeout=5)
        finally:
            for client in (a, b, watcher):
                await client.close()


async def test_status_table_json_and_node_metrics() -> None:
    with ClusterProcess(workers=2) as cluster:
        a = await connect_on(cluster, 0)
        b = await connect_on(cluster, 1)
        try:
            await await_until(lambda: keys_everywhere(cluster, 2), what="directory sync")
            for _ in range(5):
                await a.send(b.public_key, b"x")
                await b.recv_packet(timeout=5)
            cmd = [sys.executable, "-m", "cluster", "status", "--run-dir", str(cluster.run_dir)]
            out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30, check=True).stdout
            doc = json.loads(out)
            assert [w["clients"] for w in doc["workers"]] == [1, 1]
            assert sum(w["packets"] for w in doc["workers"]) >= 5
            assert doc["directory"]["size"] == 2
            table = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True,
                                   env={**os.environ, "COLUMNS": "160"}).stdout
            assert "workers of" in table and "restarts" in table
            # Prometheus text on the admin path sums every worker, whichever worker answers
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(cluster.base + "/metrics", timeout=10).read().decode())
            assert "derp_current_connections 2.0" in text
            assert "derp_cluster_workers_up 2.0" in text
            assert 'derp_packets_dropped_total{reason="unknown_dest"}' in text
        finally:
            await a.close()
            await b.close()


async def test_no_health_to_a_shadowed_duplicate_on_same_worker() -> None:
    """derper never sends Health (tailscaled shows it as a warning): a shadowed duplicate gets none."""
    with ClusterProcess(workers=1) as cluster:
        key = PrivateKey.generate()
        first = await DerpClient.connect(cluster.url, key)
        second = await DerpClient.connect(cluster.url, key)
        try:
            await sync(second)
            with pytest.raises(TimeoutError):
                event = await first.recv(timeout=1)
                assert not isinstance(event, Health), event
        finally:
            await first.close()
            await second.close()
