"""mesh.derper_keys: which worker of a node holds the stock-derper connections, and the other
workers' copy of the keys it learned (pure: no sockets, `now` passed in)."""

from __future__ import annotations

from mesh.derper_keys import Replica, holder
from mesh.directory import Owner
from mesh.membership import Member

DEAD_AFTER = 3.0
K1, K2, K3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def members(me: Owner, *, alive: dict[int, bool], heard: bool = True, added: float = 0.0) -> dict[Owner, Member]:
    return {Owner(me.node, w): Member(Owner(me.node, w), f"ipc://{w}", alive=a, ever_heard=heard, last_heard=added)
            for w, a in alive.items() if w != me.worker}


def test_worker_zero_always_holds_while_it_runs() -> None:
    me = Owner("n", 0)
    assert holder(me, members(me, alive={1: True, 2: True}), 10.0, DEAD_AFTER) == me


def test_lowest_live_worker_holds() -> None:
    me = Owner("n", 2)
    assert holder(me, members(me, alive={0: True, 1: True}), 10.0, DEAD_AFTER) == Owner("n", 0)
    assert holder(me, members(me, alive={0: False, 1: True}), 10.0, DEAD_AFTER) == Owner("n", 1)
    assert holder(me, members(me, alive={0: False, 1: False}), 10.0, DEAD_AFTER) == me


def test_a_lower_worker_not_yet_heard_holds_for_dead_after() -> None:
    """At startup nobody has heard anybody: worker 1 must not open connections worker 0 holds."""
    me = Owner("n", 1)
    starting = members(me, alive={0: False}, heard=False, added=100.0)
    assert holder(me, starting, 101.0, DEAD_AFTER) == Owner("n", 0)
    assert holder(me, starting, 100.0 + DEAD_AFTER, DEAD_AFTER) == me


def test_other_nodes_never_hold_ours() -> None:
    me = Owner("b", 1)
    other = {Owner("a", 0): Member(Owner("a", 0), "tcp://x", alive=True, ever_heard=True)}
    assert holder(me, other, 10.0, DEAD_AFTER) == me


def test_replica_applies_numbered_deltas_and_asks_on_a_gap() -> None:
    replica = Replica()
    replica.reset(Owner("n", 0), 7)
    assert replica.apply(1, present=[K1, K2], gone=[], full=False) == ({K1, K2}, set())
    assert replica.apply(2, present=[], gone=[K1], full=False) == (set(), {K1})
    assert replica.apply(4, present=[K3], gone=[], full=False) is None  # 3 went missing
    assert replica.keys == {K2}
    assert replica.apply(4, present=[K2, K3], gone=[], full=True) == ({K3}, set())
    assert replica.keys == {K2, K3} and replica.seq == 4


def test_replica_synced_once_the_holders_heartbeat_count_is_applied() -> None:
    replica = Replica()
    assert not replica.synced
    replica.reset(Owner("n", 0), 7)
    assert replica.heartbeat(2, True)  # two deltas announced, none seen: ask for the list
    assert not replica.synced
    replica.apply(2, present=[K1], gone=[], full=True)
    assert not replica.heartbeat(2, True)
    assert replica.synced
    replica.heartbeat(3, False)  # a derper connection not watched yet
    assert not replica.synced


def test_following_a_new_holder_forgets_the_old_keys() -> None:
    replica = Replica()
    replica.reset(Owner("n", 0), 7)
    replica.apply(1, present=[K1, K2], gone=[], full=False)
    assert replica.reset(Owner("n", 0), 8) == {K1, K2}
    assert replica.keys == set() and replica.seq == 0 and replica.incarnation == 8


def test_a_delta_saying_watched_syncs_without_waiting_for_a_heartbeat() -> None:
    replica = Replica()
    replica.reset(Owner("n", 0), 7)
    replica.apply(1, present=[], gone=[], full=False, watched=True)
    assert replica.synced
