"""mesh.join_gate: a starting worker holds ServerInfo until it has joined its mesh, or for at most
the timeout (pure: every call takes `now`)."""

from __future__ import annotations

from mesh.join_gate import JoinGate


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
