"""Several `cluster up` nodes on loopback forming one relay fabric over the ZeroMQ mesh."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from contextlib import ExitStack, suppress
from pathlib import Path

import pytest
import zmq

from mesh import wire
from relay_worker.client import DerpClient, DerpClientError, PeerGone, RecvPacket
from tests.support import ClusterProcess, await_until, free_port_range

pytestmark = pytest.mark.slow


class Node(ClusterProcess):
    def __init__(self, name: str, region: int, *, workers: int = 2, join: list[Node] | None = None,
                 secret: Path | None = None, dead_after: float = 3.0) -> None:
        self.mesh_port = free_port_range(workers)
        args = ["--node-name", name, "--region-id", str(region), "--mesh-listen", f"127.0.0.1:{self.mesh_port}",
                "--node-dead-after", str(dead_after)]
        if join:
            args += ["--join", ",".join(f"127.0.0.1:{n.mesh_port}" for n in join)]
        if secret is not None:
            args += ["--mesh-secret-file", str(secret)]
        super().__init__(*args, workers=workers)
        self.name = name

    def alive_peers(self) -> list[int]:
        return [doc["mesh"]["peers_alive"] for doc in self.all_varz()]

    def dir_sizes(self) -> list[int]:
        return [doc["directory"]["size"] for doc in self.all_varz()]


def keygen(tmp: Path) -> Path:
    path = tmp / "mesh.secret"
    subprocess.run([sys.executable, "-m", "cluster", "keygen", "--out", str(path)], check=True,
                   capture_output=True, timeout=30)
    assert (path.stat().st_mode & 0o777) == 0o600
    return path


def all_sizes(nodes: list[Node], n: int) -> bool:
    return all(size == n for node in nodes for size in node.dir_sizes())


async def test_three_nodes_two_regions_all_to_all_exactly_once(tmp_path: Path) -> None:
    secret = keygen(tmp_path)
    with ExitStack() as stack:
        a = stack.enter_context(Node("a", 901, secret=secret))
        b = stack.enter_context(Node("b", 901, secret=secret, join=[a]))
        c = stack.enter_context(Node("c", 902, secret=secret, join=[b]))
        nodes = [a, b, c]
        await await_until(lambda: all(p == 5 for n in nodes for p in n.alive_peers()), timeout=30,
                          what="every worker to see the 5 other workers")
        clients: list[DerpClient] = []
        for node in nodes:
            clients += await asyncio.gather(*(DerpClient.connect(node.url) for _ in range(20)))
        try:
            spread = [doc["worker"]["current_connections"] for n in nodes for doc in n.all_varz()]
            assert all(count > 0 for count in spread), spread
            await await_until(lambda: all_sizes(nodes, 60), timeout=30, what="directories to hold all 60 keys")
            index_of = {cl.public_key: i for i, cl in enumerate(clients)}
            for i, sender in enumerate(clients):
                for j, receiver in enumerate(clients):
                    if i != j:
                        sender.send_nowait(receiver.public_key, f"{i}>{j}".encode())
                await sender.flush()
            for j, receiver in enumerate(clients):
                got = [await receiver.recv_packet(timeout=20) for _ in range(59)]
                assert all(count == 1 for count in Counter(p.data for p in got).values())
                for packet in got:
                    src, dst = packet.data.decode().split(">")
                    assert int(dst) == j and index_of[packet.src] == int(src)
            cross = sum(doc["mesh"]["packets_out"] for n in nodes for doc in n.all_varz())
            assert cross > 0
        finally:
            await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)


async def test_killed_node_keys_leave_everywhere_then_it_comes_back(tmp_path: Path) -> None:
    secret = keygen(tmp_path)
    with ExitStack() as stack:
        a = stack.enter_context(Node("a", 901, secret=secret))
        b = stack.enter_context(Node("b", 902, secret=secret, join=[a]))
        await await_until(lambda: all(p == 3 for n in (a, b) for p in n.alive_peers()), timeout=30,
                          what="mesh to form")
        on_b = await asyncio.gather(*(DerpClient.connect(b.url) for _ in range(4)))
        on_a = await DerpClient.connect(a.url)
        try:
            await await_until(lambda: all_sizes([a, b], 5), timeout=20, what="directory sync")
            for client in on_b:
                await client.send(on_a.public_key, b"from b")
            for _ in on_b:
                assert (await on_a.recv_packet(timeout=10)).data == b"from b"
            # kill -9 the whole node b: supervisor and workers
            for pid in b.worker_pids():
                os.kill(pid, signal.SIGKILL)
            assert b.proc is not None
            b.proc.kill()
            gone: set[bytes] = set()
            loop = asyncio.get_running_loop()
            started = loop.time()
            while len(gone) < len(on_b):
                event = await on_a.recv(timeout=15)
                if isinstance(event, PeerGone):
                    gone.add(event.key)
            took = loop.time() - started
            assert gone == {c.public_key for c in on_b}
            assert took < 3.0 + 5.0, f"PeerGone took {took:.1f}s"
            await await_until(lambda: a.dir_sizes() == [1, 1], timeout=10, what="every worker of a to drop b's keys")
            b.stop()
            b2 = stack.enter_context(Node("b", 902, secret=secret, join=[a]))
            newcomer = await DerpClient.connect(b2.url)
            await await_until(lambda: all_sizes([a, b2], 2), timeout=30, what="restarted node's keys to arrive")
            await newcomer.send(on_a.public_key, b"back again")
            assert (await on_a.recv_packet(timeout=10)).data == b"back again"
            await on_a.send(newcomer.public_key, b"welcome")
            assert (await newcomer.recv_packet(timeout=10)).data == b"welcome"
            await newcomer.close()
        finally:
            await asyncio.gather(*(cl.close() for cl in [*on_b, on_a]), return_exceptions=True)


def _node_pids(node: Node) -> list[int]:
    assert node.proc is not None
    return [node.proc.pid, *node.worker_pids()]


async def test_partition_by_sigstop_heals_to_one_directory(tmp_path: Path) -> None:
    secret = keygen(tmp_path)
    with ExitStack() as stack:
        a = stack.enter_context(Node("a", 901, secret=secret, dead_after=2.0))
        b = stack.enter_context(Node("b", 901, secret=secret, join=[a], dead_after=2.0))
        await await_until(lambda: all(p == 3 for n in (a, b) for p in n.alive_peers()), timeout=30,
                          what="mesh to form")
        ca = await DerpClient.connect(a.url)
        cb = await DerpClient.connect(b.url)
        try:
            await await_until(lambda: all_sizes([a, b], 2), timeout=20, what="directory sync")
            for pid in _node_pids(b):
                os.kill(pid, signal.SIGSTOP)
            try:
                await await_until(lambda: a.dir_sizes() == [1, 1], timeout=15, what="a to drop b's keys")
            finally:
                for pid in _node_pids(b):
                    os.kill(pid, signal.SIGCONT)
            await await_until(lambda: all_sizes([a, b], 2), timeout=30, what="partition to heal")
            digests = set()
            for node in (a, b):
                for doc in node.all_varz():
                    digests.add((doc["directory"]["keys"], doc["directory"]["size"]))
            assert len(digests) == 1
            for attempt in range(50):
                await ca.send(cb.public_key, b"healed %d" % attempt)
                try:
                    got = await cb.recv_packet(timeout=0.3)
                    assert got.src == ca.public_key
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("forwarding did not resume after the partition healed")
        finally:
            await ca.close()
            await cb.close()


async def test_zeromq_sender_without_the_secret_cannot_inject(tmp_path: Path) -> None:
    secret = keygen(tmp_path)
    with Node("a", 901, secret=secret, workers=1) as a:
        victim = await DerpClient.connect(a.url)
        try:
            await await_until(lambda: a.dir_sizes() == [1], timeout=10, what="key published")
            context = zmq.Context()
            attempts = []
            # 1) plain (no CURVE) PUSH; 2) CURVE with a made-up keypair and a guessed server key
            plain = context.socket(zmq.PUSH)
            attempts.append(plain)
            rogue = context.socket(zmq.PUSH)
            public, secret_key = zmq.curve_keypair()
            rogue.curve_publickey, rogue.curve_secretkey, rogue.curve_serverkey = public, secret_key, public
            attempts.append(rogue)
            record = wire.packet_record(victim.public_key, os.urandom(32), b"injected")
            for sock in attempts:
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"tcp://127.0.0.1:{a.mesh_port}")
                for _ in range(20):
                    with suppress(zmq.Again):
                        sock.send(wire.build_packets([record]), zmq.NOBLOCK)
            with pytest.raises(TimeoutError):
                await victim.recv_packet(timeout=2.0)
            assert a.varz()["mesh"]["packets_in"] == 0
            for sock in attempts:
                sock.close()
            context.term()
        finally:
            await victim.close()


def test_mesh_beyond_loopback_without_secret_is_refused() -> None:
    result = subprocess.run([sys.executable, "-m", "cluster", "up", "--mesh-listen", "0.0.0.0:7946",
                             "--listen", "127.0.0.1:1", "--no-stun"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "cluster keygen" in result.stderr and result.stderr.count("\n") == 1


async def test_status_shows_nodes(tmp_path: Path) -> None:
    secret = keygen(tmp_path)
    with ExitStack() as stack:
        a = stack.enter_context(Node("a", 901, secret=secret, workers=1))
        b = stack.enter_context(Node("b", 902, secret=secret, workers=1, join=[a]))
        await await_until(lambda: a.alive_peers() == [1] and b.alive_peers() == [1], timeout=30, what="mesh")
        out = subprocess.run([sys.executable, "-m", "cluster", "status", "--run-dir", str(a.run_dir)],
                             capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
        assert out.returncode == 0, out.stderr
        assert "b/0" in out.stdout and "902" in out.stdout and "alive" in out.stdout


_ = (DerpClientError, RecvPacket)


async def test_keys_of_a_member_heard_of_only_through_others_leave_when_it_goes_silent(tmp_path: Path) -> None:
    """Right after a join, a's workers may hold b's keys from a third party's repair before they
    ever heard b's worker itself; when b then goes silent those keys must still leave."""
    secret = keygen(tmp_path)
    with ExitStack() as stack:
        a = stack.enter_context(Node("a", 901, secret=secret, dead_after=2.0))
        b = stack.enter_context(Node("b", 902, secret=secret, join=[a], dead_after=2.0))
        clients = await asyncio.gather(*(DerpClient.connect(b.url) for _ in range(4)))
        try:
            await await_until(lambda: a.dir_sizes() == [4, 4], timeout=15, what="a to learn b's keys")
            pids = _node_pids(b)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                await await_until(lambda: a.dir_sizes() == [0, 0], timeout=15, what="b's keys to leave a")
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            await await_until(lambda: a.dir_sizes() == [4, 4] and b.dir_sizes() == [4, 4], timeout=20,
                              what="the partition to heal")
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
