"""The directory's horizon: tombstone collection, lease refresh and expiry, no resurrection.

Pure: every replica runs on one settable fake clock, the "network" is a list of messages with
delivery times drawn by hypothesis. See docs/MESH.md ("Horizon") for the argument these check.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.directory import KEY_LEN, Directory, Entry, Owner, Record
from mesh.hlc import HLC, pack

H = 20_000  # horizon, ms
R = H // 4  # refresh records older than this (what WorkerMesh does)
MAX_STEP = 3_000  # ms between two ticks of the simulation
MAX_DELAY = 4_000  # ms a message may spend in flight (R + MAX_STEP + MAX_DELAY < H)

OWNERS = [Owner("a", 0), Owner("a", 1), Owner("b", 0)]
KEYS = [bytes([n]) * KEY_LEN for n in range(6)]

PROP = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)


class Clock:
    def __init__(self, ms: int = 10_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def replica(clock: Clock, owner: Owner | None, incarnation: int = 1) -> Directory:
    return Directory(owner, incarnation, clock=HLC(clock), horizon_ms=H)


class Sim:
    """Owners writing their keys, every record broadcast to every other replica with a random delay,
    refresh and collect on every tick, and a log of every record ever sent (for replays)."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.clock = Clock()
        self.dirs = {o: replica(self.clock, o) for o in OWNERS}
        self.epochs: dict[tuple[Owner, bytes], int] = {}
        self.in_flight: list[tuple[int, Owner, list[Record]]] = []
        self.history: list[Record] = []

    def send(self, sender: Owner, records: list[Record]) -> None:
        if not records:
            return
        self.history.extend(records)
        for dst in OWNERS:
            if dst != sender:
                self.in_flight.append((self.clock.ms + self.rnd.randint(0, MAX_DELAY), dst, list(records)))

    def deliver(self, everything: bool = False) -> None:
        due = [m for m in self.in_flight if everything or m[0] <= self.clock.ms]
        self.in_flight = [m for m in self.in_flight if not (everything or m[0] <= self.clock.ms)]
        self.rnd.shuffle(due)
        for _, dst, records in due:
            d = self.dirs[dst]
            d.merge(records)
            self.send(dst, d.take_corrections())

    def tick(self, step: int) -> None:
        self.clock.ms += step
        self.deliver()
        for o, d in self.dirs.items():
            self.send(o, d.refresh(self.clock.ms, R).entries)
            d.collect(self.clock.ms)

    def write(self, op: str, o: Owner, k: bytes, preferred: bool) -> None:
        d = self.dirs[o]
        epoch = self.epochs.get((o, k), 0)
        if op == "add":
            self.epochs[(o, k)] = epoch + 1
            delta = d.local_add(k, epoch + 1, preferred)
        elif op == "remove":
            delta = d.local_remove(k, epoch)
        else:
            delta = d.local_set_preferred(k, epoch, preferred)
        self.send(o, delta.entries)

    def live(self) -> set[tuple[bytes, Owner]]:
        return {(k, o) for o, d in self.dirs.items() for k, _ in d.local_entries()}

    def truth(self) -> dict[bytes, Owner]:
        """What every replica must resolve: the owners' own view, merged."""
        d = Directory(clock=HLC(self.clock))
        for o in OWNERS:
            d.merge(self.dirs[o].local_entries())
        return dict(d.resolved)


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "remove", "pref"]),
        st.sampled_from(OWNERS),
        st.sampled_from(KEYS),
        st.booleans(),
        st.integers(0, MAX_STEP),
    ),
    max_size=60,
)


@PROP
@given(ops, st.randoms(use_true_random=False))
def test_state_shrinks_to_the_live_keys_and_nothing_dead_comes_back(
    script: list[tuple[str, Owner, bytes, bool, int]], rnd: random.Random
) -> None:
    sim = Sim(rnd)
    for op, o, k, preferred, step in script:
        sim.write(op, o, k, preferred)
        sim.tick(step)
        # leases of live owners never expire: refreshes (every tick, for records older than R)
        # arrive within MAX_DELAY, so no copy anywhere is older than R + MAX_STEP + MAX_DELAY < H
        assert all(d.expired == 0 for d in sim.dirs.values()), "a live owner's lease expired"
    sim.deliver(everything=True)
    # one horizon of quiet ticks later
    for _ in range(H // MAX_STEP + 2):
        sim.tick(MAX_STEP)
    sim.deliver(everything=True)
    truth, live = sim.truth(), sim.live()
    for d in sim.dirs.values():
        assert d.resolved == truth
        assert d.tombstone_count == 0, "a tombstone outlived the horizon"
        assert {(k, e.owner) for k, e in d.entries()} == live, "state is not just the live slots"
        assert d.expired == 0
    # Replays: every record ever sent, delivered late, in any order, to the survivors and to a
    # replica started now (a restarted worker), together with the owners' current state.
    history = list(sim.history)
    rnd.shuffle(history)
    fresh = replica(sim.clock, Owner("a", 7))
    fresh.merge(history)
    for o in OWNERS:
        fresh.merge(sim.dirs[o].local_entries())
    for d in [*sim.dirs.values(), fresh]:
        d.merge(history)
        d.collect(sim.clock.ms)
        assert d.resolved == truth, "a late record resurrected a key"
        assert d.tombstone_count == 0
        assert {(k, e.owner) for k, e in d.entries()} == live


@PROP
@given(ops, st.randoms(use_true_random=False))
def test_refresh_never_moves_a_key_and_keeps_every_lease_young(
    script: list[tuple[str, Owner, bytes, bool, int]], rnd: random.Random
) -> None:
    sim = Sim(rnd)
    for op, o, k, preferred, step in script:
        sim.write(op, o, k, preferred)
        sim.clock.ms += step
    sim.deliver(everything=True)
    observer = Directory(clock=HLC(sim.clock))
    observer.merge(sim.history)
    before = dict(observer.resolved)
    sim.clock.ms += R + 1
    refreshed: list[Record] = []
    for d in sim.dirs.values():
        delta = d.refresh(sim.clock.ms, R)
        assert delta.changes == []
        refreshed += delta.entries
        for _, e in d.local_entries():
            assert e.stamp >= pack(sim.clock.ms - R), "refresh left an old lease"
        assert d.refresh(sim.clock.ms, R).entries == []  # nothing due twice
    assert observer.merge(refreshed) == []
    assert observer.resolved == before


def test_refresh_limit_takes_the_oldest_first() -> None:
    clock = Clock()
    d = replica(clock, OWNERS[0])
    for i, k in enumerate(KEYS):
        d.local_add(k, 1)
        clock.ms += 10 * (i + 1)
    d.local_set_preferred(KEYS[0], 1, True)  # KEYS[0] is now the youngest write
    clock.ms += R
    first = d.refresh(clock.ms, R, limit=2)
    assert [k for k, _ in first] == KEYS[1:3]
    assert all(e.since and e.since < e.stamp for _, e in first)


def test_a_restarted_replica_refuses_records_older_than_its_horizon() -> None:
    clock = Clock()
    a = replica(clock, OWNERS[0])
    added = a.local_add(KEYS[0], 1).entries
    gone = a.local_remove(KEYS[0], 1).entries
    clock.ms += H + 1
    fresh = replica(clock, OWNERS[1])
    # the old add arrives without its (collected) tombstone: refused, not resurrected
    assert fresh.merge(added) == []
    assert fresh.resolve(KEYS[0]) is None and fresh.entry_count == 0 and fresh.stale_rejected == 1
    fresh.merge(gone)
    assert fresh.tombstone_count == 0


def test_an_owner_that_stops_refreshing_loses_its_keys_after_the_horizon() -> None:
    clock = Clock()
    a, b = replica(clock, OWNERS[0]), replica(clock, OWNERS[1])
    b.merge(a.local_add(KEYS[0], 1).entries)
    clock.ms += H - 1
    assert b.collect(clock.ms) == []
    clock.ms += 2
    (change,) = b.collect(clock.ms)
    assert change.key == KEYS[0] and change.new_owner is None and b.expired == 1
    # its own truth is never collected on the owner, and its next refresh brings the key back
    assert a.collect(clock.ms) == [] and a.resolve(KEYS[0]) == OWNERS[0]
    b.merge(a.refresh(clock.ms, R).entries)
    assert b.resolve(KEYS[0]) == OWNERS[0]


def test_expiry_queue_stays_bounded_under_churn_without_collect() -> None:
    clock = Clock()
    d = Directory(OWNERS[0], 1, clock=HLC(clock))  # no horizon: nothing is ever collected
    for i in range(20_000):
        d.local_set_preferred(KEYS[0], 1, bool(i % 2)) if i else d.local_add(KEYS[0], 1)
    assert len(d._expiry) <= 8 * d.entry_count + 4096


def test_horizon_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Directory(horizon_ms=0)
    with pytest.raises(RuntimeError):
        Directory().collect(0)


def test_since_survives_the_wire() -> None:
    from mesh.directory import decode_entries, encode_entries

    e = Entry(OWNERS[2], 1, 1, pack(20), True, True, since=pack(10))
    assert decode_entries(encode_entries([(KEYS[1], e)])) == [(KEYS[1], e)]


def test_config_refuses_a_horizon_shorter_than_a_live_members_silence() -> None:
    from cluster.config import ConfigError, load_config

    ok = load_config(flags={"node.tombstone_horizon": 8.0, "node.busy_grace": 1.0, "node.dead_after": 3.0})
    assert ok.node_tombstone_horizon == 8.0 and ok.node_busy_grace == 1.0
    assert load_config().node_tombstone_horizon == 120.0  # default: 2 x (30 + 10) <= 120
    for flags in ({"node.tombstone_horizon": 10.0}, {"node.busy_grace": -1.0},
                  {"node.busy_grace": 60.0}, {"node.dead_after": 60.0}):
        with pytest.raises(ConfigError, match="tombstone_horizon"):
            load_config(flags=flags)
