"""Key directory and hybrid logical clock: unit tests plus hypothesis properties."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.directory import (
    KEY_LEN,
    Change,
    Delta,
    Directory,
    DirectoryDecodeError,
    Entry,
    Owner,
    Record,
    decode_bucket_ids,
    decode_entries,
    encode_bucket_ids,
    encode_entries,
    entry_rank,
)
from mesh.hlc import COUNTER_MASK, HLC, pack, unpack, wall_ms_of


class FakeTime:
    """A settable millisecond time source."""

    def __init__(self, ms: int = 1_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def key(n: int) -> bytes:
    return bytes([n]) * KEY_LEN


A = Owner("node-a", 0)
A1 = Owner("node-a", 1)
B = Owner("node-b", 0)
C = Owner("node-c", 3)
K1, K2, K3 = key(1), key(2), key(3)


def make(owner: Owner | None = None, incarnation: int = 0, ms: int = 1_000_000, **kw: int) -> Directory:
    return Directory(owner, incarnation, clock=HLC(FakeTime(ms)), **kw)


def rec(
    k: bytes,
    owner: Owner,
    stamp: int,
    *,
    inc: int = 0,
    epoch: int = 0,
    preferred: bool = False,
    present: bool = True,
) -> Record:
    return (k, Entry(owner, inc, epoch, stamp, preferred, present))


def state(d: Directory) -> tuple[frozenset[Record], dict[bytes, Owner], bytes]:
    return frozenset(d.entries()), dict(d.resolved), d.digest()


# -- HLC ------------------------------------------------------------------------------------------


def test_pack_unpack_round_trip_and_order() -> None:
    assert unpack(pack(123, 7)) == (123, 7)
    assert wall_ms_of(pack(123, 7)) == 123
    assert pack(5, COUNTER_MASK) < pack(6, 0)
    with pytest.raises(ValueError):
        pack(1, COUNTER_MASK + 1)
    with pytest.raises(ValueError):
        pack(-1, 0)
    with pytest.raises(ValueError):
        pack(1 << 63, 0)


def test_hlc_now_follows_physical_time_and_counts_within_a_ms() -> None:
    t = FakeTime(100)
    clock = HLC(t)
    assert clock.now() == pack(100, 0)
    assert clock.now() == pack(100, 1)
    t.ms = 105
    assert clock.now() == pack(105, 0)
    t.ms = 50  # the wall clock stepped back: the HLC does not
    assert clock.now() == pack(105, 1)


def test_hlc_counter_overflow_carries_into_wall_time() -> None:
    t = FakeTime(10)
    clock = HLC(t, last=pack(10, COUNTER_MASK))
    assert clock.now() == pack(11, 0)


def test_hlc_update_adopts_remote_and_stays_ahead() -> None:
    t = FakeTime(100)
    clock = HLC(t)
    clock.now()
    remote = pack(200, 5)
    assert clock.update(remote) == pack(200, 6)
    assert clock.now() == pack(200, 7)
    # an older remote stamp only bumps the counter
    assert clock.update(pack(150, 9)) == pack(200, 8)
    # physical time past everything resets the counter
    t.ms = 300
    assert clock.update(pack(250, 0)) == pack(300, 0)


def test_hlc_update_ignores_stamps_too_far_in_the_future() -> None:
    t = FakeTime(1_000)
    clock = HLC(t, max_drift_ms=500)
    assert clock.update(pack(1_400, 0)) == pack(1_400, 1)  # within drift: adopted
    got = clock.update(pack(10_000, 0))
    assert wall_ms_of(got) == 1_400
    assert clock.drift_rejections == 1


@given(
    st.lists(
        st.tuples(st.sampled_from(["now", "update"]), st.integers(0, 10_000), st.integers(0, 10_000)),
        max_size=60,
    )
)
def test_hlc_property_strictly_monotonic(ops: list[tuple[str, int, int]]) -> None:
    t = FakeTime(0)
    clock = HLC(t, max_drift_ms=10**9)
    prev = -1
    for op, ms, remote_ms in ops:
        t.ms = ms
        if op == "now":
            s = clock.now()
        else:
            remote = pack(remote_ms, remote_ms % 7)
            s = clock.update(remote)
            assert s > remote
        assert s > prev
        assert wall_ms_of(s) >= ms
        prev = s


# -- last writer wins, tombstones -----------------------------------------------------------------


def test_lww_newest_stamp_wins_in_either_order() -> None:
    old, new = rec(K1, A, 10, epoch=1), rec(K1, A, 20, epoch=2)
    for order in ([old, new], [new, old]):
        d = make()
        d.merge(order)
        assert d.entries_for(K1) == [new[1]]
        assert d.resolve(K1) == A


def test_tombstone_beats_older_present_and_blocks_a_late_one() -> None:
    d = make()
    assert d.merge([rec(K1, A, 10)]) == [Change(K1, None, A)]
    assert d.merge([rec(K1, A, 20, present=False)]) == [Change(K1, A, None)]
    assert d.merge([rec(K1, A, 15)]) == []  # late, reordered add: no resurrection
    assert d.resolve(K1) is None
    assert len(d) == 0
    assert d.tombstone_count == 1
    assert d.entry_count == 1


def test_tombstone_wins_a_stamp_tie() -> None:
    a, b = rec(K1, A, 10), rec(K1, A, 10, present=False)
    for order in ([a, b], [b, a]):
        d = make()
        d.merge(order)
        assert d.resolve(K1) is None


def test_newer_incarnation_beats_a_greater_stamp() -> None:
    # the restarted process's clock may be behind the old one's; its entry still wins
    old, new = rec(K1, A, 500, inc=1), rec(K1, A, 100, inc=2, present=False)
    for order in ([old, new], [new, old]):
        d = make()
        d.merge(order)
        assert d.entries_for(K1) == [new[1]]


def test_entry_rank_orders_incarnation_then_stamp() -> None:
    e = Entry(A, 1, 1, 10, False, True)
    assert entry_rank(e._replace(incarnation=2, stamp=0)) > entry_rank(e)
    assert entry_rank(e._replace(stamp=11, epoch=0)) > entry_rank(e)
    assert entry_rank(e._replace(present=False)) > entry_rank(e)


# -- local writes ----------------------------------------------------------------------------------


def test_local_add_remove_produce_gossipable_deltas() -> None:
    a = make(A, 1)
    other = make()
    delta = a.local_add(K1, epoch=1)
    assert isinstance(delta, Delta)
    assert delta.changes == [Change(K1, None, A)]
    ((k, e),) = delta.entries
    assert (k, e.owner, e.incarnation, e.epoch, e.present) == (K1, A, 1, 1, True)
    assert other.merge(delta) == [Change(K1, None, A)]
    gone = a.local_remove(K1, epoch=1)
    assert gone.changes == [Change(K1, A, None)]
    assert other.merge(gone) == [Change(K1, A, None)]
    assert a.local_entries() == []
    assert state(a) == state(other)


def test_local_remove_is_epoch_guarded() -> None:
    a = make(A)
    a.local_add(K1, epoch=1)
    a.local_add(K1, epoch=2)  # the client reconnected to the same worker
    stale = a.local_remove(K1, epoch=1)  # the old connection's close arrives late
    assert not stale
    assert stale.entries == [] and stale.changes == []
    assert a.resolve(K1) == A
    assert a.local_remove(K1, epoch=2).changes == [Change(K1, A, None)]
    assert not a.local_remove(K1, epoch=2)  # twice: nothing


def test_local_add_with_an_older_epoch_is_refused() -> None:
    a = make(A)
    a.local_add(K1, epoch=5)
    assert not a.local_add(K1, epoch=4)
    assert a.local_entries()[0][1].epoch == 5


def test_local_writes_are_stamped_increasingly_even_if_time_stands_still() -> None:
    a = make(A)
    s1 = a.local_add(K1, 1).entries[0][1].stamp
    s2 = a.local_set_preferred(K1, 1, True).entries[0][1].stamp
    s3 = a.local_remove(K1, 1).entries[0][1].stamp
    assert s1 < s2 < s3


def test_local_set_preferred() -> None:
    a = make(A)
    a.local_add(K1, epoch=1)
    assert not a.local_set_preferred(K1, epoch=2, preferred=True)  # not the live connection
    assert not a.local_set_preferred(K1, epoch=1, preferred=False)  # unchanged
    d = a.local_set_preferred(K1, epoch=1, preferred=True)
    assert d.entries[0][1].preferred
    assert a.entries_for(K1)[0].preferred


def test_local_writes_need_an_owner_and_a_valid_key() -> None:
    with pytest.raises(RuntimeError):
        make().local_add(K1, 1)
    with pytest.raises(ValueError):
        make(A).local_add(b"short", 1)
    with pytest.raises(ValueError):
        make(A).local_add(K1, -1)


# -- resolution -----------------------------------------------------------------------------------


def test_preferred_beats_newer_non_preferred() -> None:
    d = make()
    d.merge([rec(K1, A, 10, preferred=True), rec(K1, B, 99)])
    assert d.resolve(K1) == A


def test_newest_wins_among_equally_preferred() -> None:
    d = make()
    d.merge([rec(K1, A, 10), rec(K1, B, 20)])
    assert d.resolve(K1) == B
    d2 = make()
    d2.merge([rec(K1, A, 30, preferred=True), rec(K1, B, 20, preferred=True)])
    assert d2.resolve(K1) == A


def test_exact_tie_broken_by_owner_identically_everywhere() -> None:
    recs = [rec(K1, A, 10), rec(K1, A1, 10), rec(K1, B, 10)]
    answers = set()
    for _ in range(10):
        random.shuffle(recs)
        d = make()
        d.merge(recs)
        answers.add(d.resolve(K1))
    assert answers == {max(A, A1, B)}


def test_changes_report_moves_between_owners() -> None:
    d = make()
    assert d.merge([rec(K1, A, 10)]) == [Change(K1, None, A)]
    assert d.merge([rec(K1, B, 20)]) == [Change(K1, A, B)]
    assert d.merge([rec(K1, C, 5)]) == []  # older: B keeps it
    assert d.merge([rec(K1, B, 30, present=False)]) == [Change(K1, B, A)]
    # several records for one key in one batch: one net change
    assert d.merge([rec(K1, A, 40, present=False), rec(K1, C, 50, present=False)]) == [Change(K1, A, None)]
    assert d.merge([rec(K2, A, 60), rec(K2, A, 70, present=False)]) == []  # appeared and left


def test_two_workers_holding_the_same_key() -> None:
    w0, w1 = make(A, ms=1000), make(A1, ms=2000)
    d0 = w0.local_add(K1, epoch=1)
    d1 = w1.local_add(K1, epoch=1)
    for d in (w0, w1):
        d.merge(d0)
        d.merge(d1)
    assert w0.resolve(K1) == w1.resolve(K1) == A1  # the newer connection
    # the newer one closes: packets go back to the older one, nobody gets PeerGone
    gone = w1.local_remove(K1, epoch=1)
    assert gone.changes == [Change(K1, A1, A)]
    assert w0.merge(gone) == [Change(K1, A1, A)]


# -- dead owners ----------------------------------------------------------------------------------


def test_mark_dead_evicts_and_rejects_late_deltas() -> None:
    d = make()
    d.merge([rec(K1, A, 10, inc=3), rec(K2, A, 10, inc=3), rec(K2, B, 5)])
    changes = d.mark_dead(A, 3)
    assert sorted(changes) == sorted([Change(K1, A, None), Change(K2, A, B)])
    assert d.entries_owned_by(A) == []
    # a late delta (or anti-entropy repair) from the dead incarnation is rejected
    assert d.merge([rec(K3, A, 99, inc=3), rec(K1, A, 99, inc=2)]) == []
    assert d.resolve(K3) is None
    assert d.dead_incarnation(A) == 3
    # marking an older incarnation dead afterwards changes nothing
    assert d.mark_dead(A, 1) == []


def test_new_incarnation_after_death_is_welcome() -> None:
    d = make()
    d.merge([rec(K1, A, 500, inc=3)])
    d.mark_dead(A, 3)
    assert d.merge([rec(K1, A, 100, inc=4)]) == [Change(K1, None, A)]
    assert d.known_incarnation(A) == 4


def test_drop_owner_uses_greatest_seen_incarnation_and_whole_nodes() -> None:
    d = make()
    d.merge([rec(K1, A, 10, inc=2), rec(K2, A1, 10, inc=7), rec(K3, B, 10)])
    assert d.drop_owner(A) == [Change(K1, A, None)]
    assert d.dead_incarnation(A) == 2
    assert d.drop_owner("node-a") == [Change(K2, A1, None)]
    assert d.dead_incarnation(A1) == 7
    assert d.resolve(K3) == B
    assert d.drop_owner("nobody") == []
    assert d.drop_owner(C) == []  # never seen: nothing to mark


def test_drop_owner_with_explicit_incarnation_spares_a_newer_one() -> None:
    d = make()
    d.merge([rec(K1, A, 10, inc=1), rec(K2, A, 10, inc=2)])  # fast restart: both seen
    assert d.drop_owner(A, incarnation=1) == [Change(K1, A, None)]
    assert d.resolve(K2) == A


def test_drop_node_reports_each_key_once() -> None:
    d = make()
    d.merge([rec(K1, A, 10), rec(K1, A1, 20), rec(K1, B, 5)])
    assert d.drop_owner("node-a") == [Change(K1, A1, B)]


def test_own_previous_incarnation_is_dead_and_own_live_one_cannot_be_killed() -> None:
    d = make(A, incarnation=5)
    assert d.merge([rec(K1, A, 10**12, inc=4)]) == []  # our previous process's entry
    assert d.dead_incarnation(A) == 4
    with pytest.raises(ValueError):
        d.mark_dead(A, 5)
    d.local_add(K1, 1)
    assert d.drop_owner("node-a") == []  # our own node: our live entry stays
    assert d.resolve(K1) == A


def test_reincarnate_recovers_from_a_false_death() -> None:
    a = make(A, incarnation=1)
    other = make()
    other.merge(a.local_add(K1, 1))
    other.mark_dead(A, 1)  # wrongly declared dead
    assert other.merge(a.local_add(K2, 1)) == []  # rejected
    delta = a.reincarnate(2)
    assert {e.incarnation for _, e in delta} == {2}
    assert delta.changes == []  # locally nothing moved
    assert sorted(other.merge(delta)) == sorted([Change(K1, None, A), Change(K2, None, A)])
    assert state(a) == state(other)
    with pytest.raises(ValueError):
        a.reincarnate(2)


# -- owner authority ------------------------------------------------------------------------------


def test_owner_refutes_a_zombie_entry_about_itself() -> None:
    a = make(A, incarnation=1)
    zombie = rec(K1, A, pack(1_030_000, 0), inc=1, epoch=7)  # we never had/no longer have it; 30 s ahead
    assert a.merge([zombie]) == []
    assert a.resolve(K1) is None
    (fix,) = a.take_corrections()
    assert fix[1].present is False and fix[1].stamp > zombie[1].stamp and fix[1].epoch == 7
    assert a.take_corrections() == []
    stale = make()
    stale.merge([zombie])
    assert stale.merge([fix]) == [Change(K1, A, None)]


def test_owner_reasserts_its_live_entry_against_a_newer_tombstone() -> None:
    a = make(A, incarnation=1)
    a.local_add(K1, 3, preferred=True)
    bogus = rec(K1, A, pack(1_030_000, 0), inc=1, epoch=3, present=False)
    assert a.merge([bogus]) == []
    assert a.resolve(K1) == A
    (fix,) = a.take_corrections()
    assert fix[1].present and fix[1].preferred and fix[1].stamp > bogus[1].stamp
    # and later local writes still win over the correction
    assert a.local_remove(K1, 3).changes == [Change(K1, A, None)]


def test_records_from_beyond_the_clock_drift_are_refused() -> None:
    # they would win every slot they name and outlive every horizon (a broken clock, or a member
    # making stamps up); within the drift (60 s) they are merged as usual
    a = make(A, incarnation=1)  # physical time 1_000_000 ms
    a.local_add(K1, 1)
    far = [rec(K1, A, pack(1_060_001, 0), inc=1, epoch=1, present=False), rec(K2, B, pack(1_060_001, 0))]
    assert a.merge(far) == [] and a.take_corrections() == []
    assert a.future_rejected == 2 and a.resolve(K1) == A and a.resolve(K2) is None
    assert a.clock.last < pack(1_000_001)  # nor did the clock move
    assert a.merge([rec(K2, B, pack(1_059_999, 0))]) == [Change(K2, None, B)]


def test_owner_accepts_echoes_of_its_own_writes() -> None:
    a = make(A, incarnation=1)
    live = a.local_add(K2, 1)
    assert a.merge(live) == []
    delta = a.local_add(K1, 1)
    gone = a.local_remove(K1, 1)
    assert a.merge(list(delta) + list(gone)) == []
    assert a.take_corrections() == []


# -- garbage collection ---------------------------------------------------------------------------


def test_gc_removes_only_old_records() -> None:
    t = FakeTime(10_000)
    d = Directory(clock=HLC(t))
    d.merge([rec(K1, A, pack(1_000), present=False), rec(K2, A, pack(9_500), present=False)])
    d.merge([rec(K3, A, pack(1_000)), rec(K3, B, pack(9_000))])
    assert d.tombstone_count == 2
    # the old tombstone goes, and so does the old present entry: its owner stopped renewing it
    assert d.gc(older_than_ms=5_000) == 2
    assert d.tombstone_count == 1
    assert d.entries_for(K1) == []
    assert d.entries_for(K3) == [Entry(B, 0, 0, pack(9_000), False, True)]
    assert d.resolve(K3) == B and d.expired == 1
    assert d.gc(older_than_ms=5_000) == 0


def test_after_gc_old_records_neither_come_back_nor_stay() -> None:
    t = FakeTime(10_000)
    d = Directory(clock=HLC(t))
    d.merge([rec(K1, A, pack(1_000))])
    assert d.gc(older_than_ms=9_500) == 0  # horizon 500: nothing older yet
    d.gc(older_than_ms=5_000)  # horizon: 5_000; K1's entry expires with it
    assert d.resolve(K1) is None and d.expired == 1
    # a late copy of the old present entry does not come back, nor does an old tombstone stay
    assert d.merge([rec(K1, A, pack(1_000))]) == []
    assert d.stale_rejected == 1
    assert d.merge([rec(K1, A, pack(2_000), present=False)]) == []
    assert d.entry_count == 0 and d.tombstone_count == 0
    assert d.merge([rec(K2, A, pack(3_000), present=False)]) == []
    assert d.entry_count == 0
    # a recent tombstone is kept as usual
    d.merge([rec(K2, A, pack(9_000), present=False)])
    assert d.tombstone_count == 1


def test_stats() -> None:
    d = make(A)
    d.local_add(K1, 1)
    d.local_add(K2, 1)
    d.local_remove(K2, 1)
    d.merge([rec(K3, B, 1)])
    assert len(d) == 2 and K1 in d and K2 not in d
    assert d.stats() == {"keys": 2, "entries": 3, "tombstones": 1, "local": 1, "owners": 2, "dead_owners": 0,
                         "stale_rejected": 0, "expired": 0, "future_rejected": 0}


# -- anti-entropy ---------------------------------------------------------------------------------


def test_digest_and_repair() -> None:
    x, y = make(n_buckets=16), make(n_buckets=16)
    assert x.digest() == y.digest() and len(x.digest()) == 16 * 8
    x.merge([rec(key(0x10), A, 5), rec(key(0x20), A, 5)])
    y.merge([rec(key(0x10), A, 6, present=False), rec(key(0xF0), B, 5)])
    ids = y.diff_buckets(x.digest())
    assert ids == sorted({y.bucket_of(key(0x10)), y.bucket_of(key(0x20)), y.bucket_of(key(0xF0))})
    x.merge(y.entries_in_buckets(ids))
    y.merge(x.entries_in_buckets(ids))
    assert state(x) == state(y)
    assert x.diff_buckets(y.digest()) == []
    assert x.resolve(key(0x10)) is None


def test_entries_owned_by() -> None:
    d = make()
    d.merge([rec(K1, A, 1), rec(K2, A, 1, present=False), rec(K1, B, 1)])
    assert sorted(d.entries_owned_by(A)) == sorted([rec(K1, A, 1), rec(K2, A, 1, present=False)])


def test_bad_digest_and_bucket_ids() -> None:
    d = make(n_buckets=4)
    with pytest.raises(DirectoryDecodeError):
        d.diff_buckets(b"\x00" * 31)
    with pytest.raises(DirectoryDecodeError):
        d.diff_buckets("nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        d.entries_in_buckets([4])
    with pytest.raises(ValueError):
        Directory(n_buckets=3)
    assert decode_bucket_ids(encode_bucket_ids([3, 1, 1]), 4) == [1, 3]
    for bad in (msgpack.packb([4]), msgpack.packb([True]), msgpack.packb({}), b"\xc1", msgpack.packb([0] * 5)):
        with pytest.raises(DirectoryDecodeError):
            decode_bucket_ids(bad, 4)


# -- encoding -------------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    recs = [
        rec(K1, A, pack(123, 4), inc=2, epoch=9, preferred=True),
        rec(K2, A, 7, present=False),
        rec(K3, Owner("ñødé", 2**32 - 1), 2**63 - 1, inc=2**63 - 1, epoch=2**63 - 1),
        (K1, Entry(B, 1, 2, pack(50), False, True, since=pack(40))),  # a refreshed lease: 7 fields
    ]
    assert decode_entries(encode_entries(recs)) == recs
    assert decode_entries(encode_entries(Delta(recs, []))) == recs
    assert decode_entries(encode_entries([])) == []


def _valid_doc() -> list[object]:
    return [1, [["n", 0]], [[K1, 0, 1, 2, 3, 1]]]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.__setitem__(0, 2),
        lambda d: d.__setitem__(0, True),
        lambda d: d.pop(),
        lambda d: d.__setitem__(1, {}),
        lambda d: d[1].__setitem__(0, ["", 0]),
        lambda d: d[1].__setitem__(0, ["x" * 256, 0]),
        lambda d: d[1].__setitem__(0, ["n", -1]),
        lambda d: d[1].__setitem__(0, ["n", 2**32]),
        lambda d: d[1].__setitem__(0, [b"n", 0]),
        lambda d: d[2][0].__setitem__(0, b"short"),
        lambda d: d[2][0].__setitem__(0, "x" * 32),
        lambda d: d[2][0].__setitem__(1, 1),
        lambda d: d[2][0].__setitem__(2, -1),
        lambda d: d[2][0].__setitem__(3, 1.5),
        lambda d: d[2][0].__setitem__(4, 2**63),
        lambda d: d[2][0].__setitem__(5, 4),
        lambda d: d[2][0].__setitem__(5, False),
        lambda d: d[2][0].append(0),
        lambda d: d[2][0].append(3),  # since == stamp: not canonical (0 says that)
        lambda d: d[2][0].append(4),  # since after stamp
        lambda d: d[2][0].append(True),
        lambda d: d[2][0].extend([1, 1]),
        lambda d: d[2].append(None),
    ],
)
def test_decode_rejects_malformed_documents(mutate: object) -> None:
    doc = _valid_doc()
    assert decode_entries(msgpack.packb(doc, use_bin_type=True))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(DirectoryDecodeError):
        decode_entries(msgpack.packb(doc, use_bin_type=True))


def test_decode_rejects_non_msgpack_and_trailing_bytes() -> None:
    good = encode_entries([rec(K1, A, 1)])
    for bad in (b"", b"\xc1", good + b"\x00", good[:-1], b"\x92\xff", "text"):
        with pytest.raises(DirectoryDecodeError):
            decode_entries(bad)  # type: ignore[arg-type]


@given(st.binary(max_size=300))
def test_decode_random_bytes_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DirectoryDecodeError):
        decode_entries(data)


@given(st.binary(min_size=1, max_size=400), st.data())
def test_decode_mutated_valid_messages_raises_only_decode_error(_seed: bytes, data: st.DataObject) -> None:
    recs = data.draw(st.lists(records(), max_size=4))
    raw = bytearray(encode_entries(recs))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            out = decode_entries(candidate)
        except DirectoryDecodeError:
            continue
        for k, e in out:  # whatever decodes is well-typed
            assert type(k) is bytes and len(k) == KEY_LEN
            assert type(e.owner.node) is str and type(e.owner.worker) is int


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=30,
)


@given(msgpack_values)
def test_decode_arbitrary_msgpack_raises_only_decode_error(value: object) -> None:
    with contextlib.suppress(DirectoryDecodeError):
        decode_entries(msgpack.packb(value, use_bin_type=True))


# -- properties: convergence ----------------------------------------------------------------------

KEYS = [bytes([b]) + bytes(KEY_LEN - 1) for b in (0x00, 0x41, 0x80, 0xC3)]
OWNERS = [A, A1, B, C]


@st.composite
def records(draw: st.DrawFn) -> Record:
    stamp = draw(st.integers(0, 6))
    return (
        draw(st.sampled_from(KEYS)),
        Entry(
            owner=draw(st.sampled_from(OWNERS)),
            incarnation=draw(st.integers(0, 2)),
            epoch=draw(st.integers(0, 2)),
            stamp=stamp,
            preferred=draw(st.booleans()),
            present=draw(st.booleans()),
            since=draw(st.integers(0, stamp - 1)) if stamp > 1 else 0,  # a refreshed lease
        ),
    )


def merged(recs: Iterable[Record], batches: list[int] | None = None, **kw: int) -> Directory:
    d = make(**kw)
    recs = list(recs)
    if not batches:
        d.merge(recs)
        return d
    i = 0
    for size in batches:
        d.merge(recs[i : i + size])
        i += size
    d.merge(recs[i:])
    return d


def brute_force(recs: Iterable[Record], dead: dict[Owner, int] | None = None) -> tuple[set[Record], dict]:
    """The reference semantics: per slot, the max by rank of the live records; resolve by
    (preferred, stamp, owner) among the present ones."""
    dead = dead or {}
    best: dict[tuple[bytes, Owner], Entry] = {}
    for k, e in recs:
        if e.incarnation <= dead.get(e.owner, -1):
            continue
        cur = best.get((k, e.owner))
        if cur is None or entry_rank(e) > entry_rank(cur):
            best[(k, e.owner)] = e
    resolved: dict[bytes, Owner] = {}
    for k in {k for k, _ in best}:
        present = [e for (kk, _), e in best.items() if kk == k and e.present]
        if present:
            resolved[k] = max(present, key=lambda e: (e.preferred, e.since or e.stamp, e.owner)).owner
    return {(k, e) for (k, _), e in best.items()}, resolved


PROP = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)


@PROP
@given(st.lists(records(), max_size=30), st.data())
def test_merge_is_order_and_duplication_independent(recs: list[Record], data: st.DataObject) -> None:
    dups = data.draw(st.lists(st.sampled_from(recs), max_size=10)) if recs else []
    shuffled = data.draw(st.permutations(recs + dups))
    batches = data.draw(st.lists(st.integers(0, 5), max_size=8))
    one, two = merged(recs), merged(shuffled, batches)
    assert state(one) == state(two)
    assert one.tombstone_count == two.tombstone_count and len(one) == len(two)
    expected_entries, expected_resolved = brute_force(recs)
    assert set(one.entries()) == expected_entries
    assert one.resolved == expected_resolved


@PROP
@given(st.lists(records(), max_size=30), st.lists(records(), max_size=10))
def test_merge_is_idempotent_and_changes_track_resolved(recs: list[Record], more: list[Record]) -> None:
    d = make()
    view: dict[bytes, Owner] = {}
    for batch in (recs, more, recs + more):
        for ch in d.merge(batch):
            assert view.get(ch.key) == ch.old_owner
            assert ch.old_owner != ch.new_owner
            if ch.new_owner is None:
                del view[ch.key]
            else:
                view[ch.key] = ch.new_owner
        assert view == d.resolved
    before = state(d)
    assert d.merge(recs + more) == []
    assert state(d) == before


@PROP
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("merge"), records()),
            st.tuples(st.just("dead"), st.tuples(st.sampled_from(OWNERS), st.integers(0, 2))),
        ),
        max_size=30,
    ),
    st.randoms(use_true_random=False),
)
def test_mark_dead_commutes_with_merge(ops: list[tuple[str, object]], rnd: random.Random) -> None:
    shuffled = list(ops)
    rnd.shuffle(shuffled)
    replicas = []
    for seq in (ops, shuffled):
        d = make()
        for op, arg in seq:
            if op == "merge":
                d.merge([arg])  # type: ignore[list-item]
            else:
                d.mark_dead(*arg)  # type: ignore[misc]
        replicas.append(d)
    assert state(replicas[0]) == state(replicas[1])
    dead: dict[Owner, int] = {}
    for op, arg in ops:
        if op == "dead":
            o, inc = arg  # type: ignore[misc]
            dead[o] = max(dead.get(o, -1), inc)
    recs = [arg for op, arg in ops if op == "merge"]
    expected_entries, expected_resolved = brute_force(recs, dead)  # type: ignore[arg-type]
    assert set(replicas[0].entries()) == expected_entries
    assert replicas[0].resolved == expected_resolved


@PROP
@given(st.lists(records(), max_size=30), st.data(), st.sampled_from([1, 2, 4, 256]))
def test_anti_entropy_makes_divergent_replicas_equal(recs: list[Record], data: st.DataObject, n_buckets: int) -> None:
    in_x = data.draw(st.lists(st.booleans(), min_size=len(recs), max_size=len(recs)))
    in_y = data.draw(st.lists(st.booleans(), min_size=len(recs), max_size=len(recs)))
    x = merged([r for r, f in zip(recs, in_x, strict=True) if f], n_buckets=n_buckets)
    y = merged([r for r, f in zip(recs, in_y, strict=True) if f], n_buckets=n_buckets)
    if frozenset(x.entries()) == frozenset(y.entries()):
        assert x.digest() == y.digest()
    # x sends its digest; y answers with its differing buckets; x answers with its own
    ids = y.diff_buckets(x.digest())
    assert ids == x.diff_buckets(y.digest())
    wire_ids = decode_bucket_ids(encode_bucket_ids(ids), n_buckets)
    x.merge(decode_entries(encode_entries(y.entries_in_buckets(wire_ids))))
    y.merge(decode_entries(encode_entries(x.entries_in_buckets(wire_ids))))
    assert state(x) == state(y)
    assert x.diff_buckets(y.digest()) == []
    union = [r for r, fx, fy in zip(recs, in_x, in_y, strict=True) if fx or fy]
    assert state(x) == state(merged(union, n_buckets=n_buckets))


@PROP
@given(st.lists(records(), max_size=20))
def test_digest_is_a_function_of_the_state(recs: list[Record]) -> None:
    d = merged(recs)
    # build the same state a different way: evict everything and merge the survivors back
    survivors = d.entries()
    for o in OWNERS:
        d.mark_dead(o, 2)
    assert d.digest() == make().digest()
    assert d.entry_count == 0 and d.tombstone_count == 0 and d.resolved == {}
    assert merged(survivors).digest() == merged(recs).digest()


@PROP
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "remove", "pref"]), st.sampled_from(KEYS), st.integers(0, 3)),
        max_size=25,
    ),
    st.lists(records(), max_size=10),
)
def test_owner_and_observer_converge_on_local_writes(ops: list[tuple[str, bytes, int]], noise: list[Record]) -> None:
    owner = make(Owner("self", 9), incarnation=1)
    observer = make()
    deltas: list[Record] = []
    for op, k, epoch in ops:
        if op == "add":
            delta = owner.local_add(k, epoch, preferred=epoch % 2 == 0)
        elif op == "remove":
            delta = owner.local_remove(k, epoch)
        else:
            delta = owner.local_set_preferred(k, epoch, True)
        deltas.extend(delta)
    owner.merge(noise)
    observer.merge(noise)
    observer.merge(reversed(deltas))
    assert state(owner) == state(observer)
    live = {k for k, _ in owner.local_entries()}
    me = Owner("self", 9)
    assert {k for k in KEYS if any(e.owner == me and e.present for e in owner.entries_for(k))} == live
    assert owner.take_corrections() == []
