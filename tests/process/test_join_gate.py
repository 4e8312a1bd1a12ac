"""mesh.join_gate: a starting worker holds ServerInfo until it has joined its mesh, or for at most
the timeout (pure: every call takes `now`)."""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack

import pytest

from mesh.join_gate import JoinGate
from relay_worker.client import DerpClient, DerpClientError
from tests.support import ClusterProcess, await_until, free_port_range


def test_a_lone_worker_is_joined_at_once() -> None:
    gate: JoinGate[str] = JoinGate(0.0, 5.0)
    assert gate.check(0.0, members=[], seeds_heard=True, derpers_watched=True) == []
    assert gate.joined and not gate.timed_out
    assert not gate.hold(lambda: None)


def test_held_until_every_member_lists_us_and_the_directories_met() -> None:
    gate: JoinGate[str] = JoinGate(0.0, 5.0)
    released: list[int] = []
    assert gate.hold(lambda: released.append(1))
    members = ["b/0", "b/1"]
    gate.heartbeat("b/0", lists_us=True, same_digest=True)
    gate.heartbeat("b/1", lists_us=False, same_digest=False)  # it does not hear us yet
    assert gate.check(0.1, members=members, seeds_heard=True, derpers_watched=True) == []
    gate.heartbeat("b/1", lists_us=True, same_digest=False)  # hears us, directories still differ
    assert gate.check(0.2, members=members, seeds_heard=True, derpers_watched=True) == []
    gate.repaired("b/1")  # its anti-entropy repair merged
    for callback in gate.check(0.3, members=members, seeds_heard=True, derpers_watched=True):
        callback()
    assert released == [1] and gate.joined and not gate.timed_out


def test_unheard_seeds_and_unwatched_derpers_hold_too() -> None:
    gate: JoinGate[str] = JoinGate(0.0, 5.0)
    gate.hold(lambda: None)
    assert gate.check(1.0, members=[], seeds_heard=False, derpers_watched=True) == []
    assert gate.check(1.0, members=[], seeds_heard=True, derpers_watched=False) == []
    assert len(gate.check(1.0, members=[], seeds_heard=True, derpers_watched=True)) == 1


def test_the_timeout_releases_once_and_the_gate_never_holds_again() -> None:
    gate: JoinGate[str] = JoinGate(10.0, 5.0)
    gate.hold(lambda: None)
    gate.hold(lambda: None)
    assert gate.check(14.9, members=["b/0"], seeds_heard=True, derpers_watched=True) == []
    assert gate.pending({"b/0"}) == ["b/0"]
    assert len(gate.check(15.0, members=["b/0"], seeds_heard=True, derpers_watched=True)) == 2
    assert gate.joined and gate.timed_out
    assert gate.check(16.0, members=["b/0"], seeds_heard=True, derpers_watched=True) == []
    assert not gate.hold(lambda: None)


# -- the gate in a real region: two nodes of ours, the second just started ---------------------------

class Node(ClusterProcess):
    def __init__(self, name: str, *, join: Node | None = None) -> None:
        self.mesh_port = free_port_range(2)
        args = ["--node-name", name, "--region-id", "901", "--mesh-listen", f"127.0.0.1:{self.mesh_port}"]
        if join is not None:
            args += ["--join", f"127.0.0.1:{join.mesh_port}"]
        super().__init__(*args, workers=2)


async def connect_as_soon_as_it_accepts(url: str) -> DerpClient:
    deadline = time.monotonic() + 60
    while True:
        try:
            return await DerpClient.connect(url)
        except (OSError, DerpClientError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["to the new node", "from the new node"])
async def test_first_packet_across_nodes_while_a_node_is_starting(direction: str) -> None:
    """derpprobe's cross-node probe against a region whose second node is starting: A connects to
    one node, B to the other; the one packet A sends as soon as B has ServerInfo is delivered. Before
    the join gate the new node's first clients were unreachable from the other node for ~0.5 s."""
    with ExitStack() as stack:
        a = stack.enter_context(Node("a"))
        await await_until(lambda: all(doc["mesh"]["peers_alive"] == 1 for doc in a.all_varz()), timeout=30,
                          what="node a's workers to see each other")
        b = Node("b", join=a)
        stack.callback(b.stop)
        b.start(wait=False)
        if direction == "to the new node":
            sender = await DerpClient.connect(a.url)
            receiver = await connect_as_soon_as_it_accepts(b.url)
        else:
            sender = await connect_as_soon_as_it_accepts(b.url)
            receiver = await DerpClient.connect(a.url)
        try:
            await sender.send(receiver.public_key, b"first")
            packet = await receiver.recv_packet(timeout=5)
            assert packet.src == sender.public_key and packet.data == b"first"
        finally:
            await asyncio.gather(sender.close(), receiver.close())
