"""The gossip-synced key directory: which owner (node, worker) holds which client key.

Pure data structure: no I/O, no sockets, no asyncio. The transport (ZeroMQ between the workers of a
host, gossip between nodes) ships the `Record` lists this module produces, encoded with
`encode_entries`, and feeds what it receives to `Directory.merge`.

State and ordering
------------------
The state is a map ``(key, owner) -> Entry``: one *slot* per client key per owner, because one
client may be connected to several owners at once. Only the owner writes its own slots (with
`local_add`, `local_remove`, `local_set_preferred`); everyone else learns them by merging.

Within a slot the winner is the entry with the greatest rank
``(incarnation, stamp, epoch, is_tombstone, preferred)``. This is a total order on entries of one
owner, so merging is "keep the max": commutative, associative and idempotent, and any multiset of
records delivered in any order, with duplicates, gives the same state. Putting the incarnation
first (rather than the stamp) means an entry from a newer process of the owner always beats one
from an older process, whatever their clocks said, and it is what makes dead incarnations
(`mark_dead`) commute with merging: a slot's maximum is either dead (then every record of the slot
is dead) or it is the maximum of the live records. Within one incarnation the HLC stamp decides,
i.e. last writer wins, and a tombstone (``present=False``) beats an older present entry.

`resolve(key)` picks, among the *present* entries of a key, the one with the greatest
``(preferred, since or stamp, owner)``: a preferred connection beats a non-preferred one, then the newest,
then the greatest ``(node, worker)``. It depends only on the state, so equal states resolve equally.
`Directory.resolved` caches it for every key and is updated incrementally; the hot path reads
``directory.resolved.get(key)``.

Dead owners
-----------
`mark_dead(owner, incarnation)` evicts every entry of that owner with an incarnation <= the given
one and from then on rejects such entries (a late delta or an anti-entropy repair from a replica that
has not noticed the death yet cannot bring them back). A later incarnation of the same owner is
accepted as usual. A directory created for ``owner`` at incarnation N treats N-1 and older of
itself as dead. Dead marks are local (membership decides them on each replica) and never collected:
one int per owner ever seen.

Owner authority
---------------
A replica that is itself an owner never lets a remote record contradict its own current
incarnation's slots: if a record claims a present entry for one of our slots that is newer than
what we hold (a zombie: an old present entry re-shipped by a replica that missed its tombstone after
the tombstone was garbage-collected), we write a fresh entry stating the truth (our live entry
re-stamped, or a tombstone) and queue it in `take_corrections()` for the transport to push.

Horizon: leases and collection
------------------------------
With ``horizon_ms`` (H), every record is a lease. An owner renews its live entries with `refresh`
before they are H old (WorkerMesh: once older than H/4); `collect(now)` forgets every record
stamped before ``now - H`` (tombstones, and other owners' present entries nobody renewed), and
`merge` refuses present records stamped before that horizon (tombstones that old are applied, then
dropped). The horizon only moves forward and a new Directory starts with it in place. So a late
present record can never resurrect a slot whose tombstone was collected: it is older than the
tombstone, hence older than the horizon that collected it (docs/MESH.md, "The directory's
horizon", has the argument and what H must exceed for live keys). A refresh re-stamps an entry but
keeps its place in `resolve` through ``since`` (the stamp of its last real write). Records stamped
beyond the clock's max drift are refused: they would win every slot and outlive every horizon.
`gc(older_than_ms)` is `collect` with an explicit horizon.

Anti-entropy
------------
The keyspace is split into `n_buckets` buckets by the key's leading bits. Each bucket's digest is the
XOR of a 64-bit blake2b hash of every record in it (maintained incrementally, so `digest()` costs
O(buckets)). Repair: A sends ``a.digest()``; B computes ``ids = b.diff_buckets(a_digest)``, sends
``b.entries_in_buckets(ids)`` and ``ids`` to A; A merges them and replies with
``a.entries_in_buckets(ids)``, which B merges. Both then hold the union of the two buckets' records.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from .hlc import COUNTER_BITS, COUNTER_MASK, HLC, MAX_STAMP, wall_ms_of

KEY_LEN = 32
DEFAULT_BUCKETS = 256
MAX_NODE_BYTES = 255
MAX_WORKER = (1 << 32) - 1
MAX_COUNTER = (1 << 63) - 1  # incarnation, epoch
WIRE_VERSION = 1
DIGEST_BYTES = 8  # per bucket

_FLAG_PRESENT = 1
_FLAG_PREFERRED = 2


class DirectoryDecodeError(ValueError):
    """Bytes from the network are not a valid directory message."""


class Owner(NamedTuple):
    """One worker process slot: a node id and the worker's index on that node."""

    node: str
    worker: int


class Entry(NamedTuple):
    """One owner's record of one key. ``present=False`` is a tombstone (the key was removed)."""

    owner: Owner
    incarnation: int  # of the owner's process; grows on every process start
    epoch: int  # connection epoch on that owner; grows on every connection
    stamp: int  # HLC stamp of the write (see mesh.hlc)
    preferred: bool
    present: bool
    #: stamp of the last write that was not a lease refresh (see "Leases"); 0 means "same as stamp"
    since: int = 0


class Change(NamedTuple):
    """The resolved owner of `key` moved; ``new_owner is None`` means the key left the directory."""

    key: bytes
    old_owner: Owner | None
    new_owner: Owner | None


Record = tuple[bytes, Entry]


@dataclass(slots=True)
class Delta:
    """The result of a local write: the records to gossip and the resolved-owner changes it caused.

    Iterating a Delta yields its records, so ``other.merge(delta)`` and ``encode_entries(delta)``
    work directly. An empty Delta (falsy) means nothing changed and there is nothing to send.
    """

    entries: list[Record] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)


def entry_rank(e: Entry) -> tuple[int, int, int, bool, bool, int]:
    """The last-writer-wins order of entries within one (key, owner) slot; greatest wins. (`since`
    comes last only to keep the order total: one owner never writes two entries with one stamp.)"""
    return (e.incarnation, e.stamp, e.epoch, not e.present, e.preferred, e.since)


def _record_hash(key: bytes, e: Entry) -> int:
    node = e.owner.node.encode()
    flags = (_FLAG_PRESENT if e.present else 0) | (_FLAG_PREFERRED if e.preferred else 0)
    packed = b"".join(
        (
            key,
            struct.pack(">H", len(node)),
            node,
            struct.pack(">IQQQB", e.owner.worker, e.incarnation, e.epoch, e.stamp, flags),
            struct.pack(">Q", e.since) if e.since else b"",
        )
    )
    return int.from_bytes(hashlib.blake2b(packed, digest_size=DIGEST_BYTES).digest(), "big")


def _check_key(key: bytes) -> None:
    if type(key) is not bytes or len(key) != KEY_LEN:
        raise ValueError(f"key must be {KEY_LEN} bytes")


def _check_counter(name: str, value: int) -> None:
    if type(value) is not int or not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"{name} must be an int in [0, 2**63)")


class Directory:
    """One replica of the key directory.

    `owner`/`incarnation` identify the process this replica lives in (needed for the ``local_*``
    writes; a pure observer may pass ``owner=None``). `clock` is the HLC used for local stamps
    (inject one with a fake time source in tests). `n_buckets` (a power of two, 1..65536) must be the
    same on every replica that exchanges digests.
    """

    def __init__(
        self,
        owner: Owner | None = None,
        incarnation: int = 0,
        *,
        clock: HLC | None = None,
        n_buckets: int = DEFAULT_BUCKETS,
        horizon_ms: int | None = None,
    ) -> None:
        if n_buckets < 1 or n_buckets > 1 << 16 or n_buckets & (n_buckets - 1):
            raise ValueError("n_buckets must be a power of two in [1, 65536]")
        _check_counter("incarnation", incarnation)
        self.owner = owner
        self.incarnation = incarnation
        self.clock = clock if clock is not None else HLC()
        self.n_buckets = n_buckets
        #: key -> owner that should receive packets for it; read this on the hot path
        self.resolved: dict[bytes, Owner] = {}
        self._slots: dict[bytes, dict[Owner, Entry]] = {}
        self._local: dict[bytes, Entry] = {}  # our own live (present) entries: the truth
        self._by_owner: dict[Owner, set[bytes]] = {}
        self._tombstones: set[tuple[bytes, Owner]] = set()
        self._dead: dict[Owner, int] = {}  # owner -> greatest dead incarnation
        self._max_inc: dict[Owner, int] = {}  # owner -> greatest incarnation seen alive
        self._bucket_shift = 16 - (n_buckets.bit_length() - 1)
        self._bucket_hash: list[int] = [0] * n_buckets
        self._bucket_keys: dict[int, set[bytes]] = {}
        self._gc_horizon_ms = -1
        #: (wall ms of stamp, key, owner) of every write, oldest first: what `collect` looks at.
        #: Lazy: an item whose slot was rewritten since is skipped when popped.
        self._expiry: list[tuple[int, bytes, Owner]] = []
        self._corrections: list[Record] = []
        self._entry_count = 0
        #: records refused because their stamp is older than the horizon (a late or replayed record)
        self.stale_rejected = 0
        #: remote present entries that expired (their owner stopped refreshing them)
        self.expired = 0
        #: records refused because their stamp is further ahead of our clock than the HLC's max drift
        self.future_rejected = 0
        if owner is not None and incarnation > 0:
            self._dead[owner] = incarnation - 1
        if horizon_ms is not None and horizon_ms <= 0:
            raise ValueError("horizon_ms must be > 0")
        self.horizon_ms = horizon_ms
        if horizon_ms is not None:
            # a fresh replica (a restarted worker) starts with the horizon in place, so the peers'
            # old records it is about to be sent are refused like anywhere else
            self._gc_horizon_ms = self.clock.physical_ms() - horizon_ms

    # -- queries ----------------------------------------------------------------------------------

    def resolve(self, key: bytes) -> Owner | None:
        """The owner that should receive packets for `key`, or None if no owner holds it."""
        return self.resolved.get(key)

    def __len__(self) -> int:
        """Number of keys with at least one present entry."""
        return len(self.resolved)

    def __contains__(self, key: object) -> bool:
        return key in self.resolved

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    @property
    def entry_count(self) -> int:
        """Number of (key, owner) slots held, present entries and tombstones."""
        return self._entry_count

    def stats(self) -> dict[str, int]:
        """Sizes for metrics."""
        return {
            "keys": len(self.resolved),
            "entries": self._entry_count,
            "tombstones": len(self._tombstones),
            "local": len(self._local),
            "owners": len(self._by_owner),
            "dead_owners": len(self._dead),
            "stale_rejected": self.stale_rejected,
            "expired": self.expired,
            "future_rejected": self.future_rejected,
        }

    def entries_for(self, key: bytes) -> list[Entry]:
        """Every owner's entry (present or tombstone) for `key`."""
        return list(self._slots.get(key, {}).values())

    def entries(self) -> list[Record]:
        """Every record held (for snapshots and tests)."""
        return [(k, e) for k, slots in self._slots.items() for e in slots.values()]

    def entries_owned_by(self, owner: Owner) -> list[Record]:
        """Every record of `owner` held here (for a full push of an owner's entries)."""
        out: list[Record] = []
        for key in self._by_owner.get(owner, ()):
            out.append((key, self._slots[key][owner]))
        return out

    def local_entries(self) -> list[Record]:
        """This process's own live entries (what it would push in full after (re)joining)."""
        return list(self._local.items())

    def dead_incarnation(self, owner: Owner) -> int | None:
        """The greatest incarnation of `owner` declared dead here, if any."""
        return self._dead.get(owner)

    def known_incarnation(self, owner: Owner) -> int | None:
        """The greatest live incarnation of `owner` seen in any record, if any."""
        return self._max_inc.get(owner)

    def owners(self) -> list[Owner]:
        """Every owner that holds at least one record here (this replica's own included)."""
        return list(self._by_owner)

    # -- local writes (this process's own keys) ---------------------------------------------------

    def local_add(self, key: bytes, epoch: int, preferred: bool = False) -> Delta:
        """A client with `key` connected here as connection `epoch`. Refused (empty Delta) if a
        newer epoch of this key is already recorded here."""
        owner = self._require_owner()
        _check_key(key)
        _check_counter("epoch", epoch)
        cur = self._slot(key, owner)
        if cur is not None and cur.incarnation == self.incarnation and epoch < cur.epoch:
            return Delta()
        e = Entry(owner, self.incarnation, epoch, self._next_stamp(cur), bool(preferred), True)
        self._local.pop(key, None)
        self._local[key] = e  # _local stays ordered by stamp, oldest first (see `refresh`)
        return self._local_write(key, e, cur)

    def local_remove(self, key: bytes, epoch: int) -> Delta:
        """Connection `epoch` of `key` closed here. Writes a tombstone only if `epoch` is the live
        connection's, so a stale disconnect after a reconnect removes nothing (empty Delta)."""
        owner = self._require_owner()
        live = self._local.get(key)
        if live is None or live.epoch != epoch:
            return Delta()
        del self._local[key]
        cur = self._slot(key, owner)
        e = Entry(owner, self.incarnation, epoch, self._next_stamp(cur), False, False)
        return self._local_write(key, e, cur)

    def local_set_preferred(self, key: bytes, epoch: int, preferred: bool) -> Delta:
        """Connection `epoch` of `key` sent NotePreferred. Empty Delta if that connection is not live
        here or the flag is unchanged."""
        owner = self._require_owner()
        live = self._local.get(key)
        if live is None or live.epoch != epoch or live.preferred == bool(preferred):
            return Delta()
        cur = self._slot(key, owner)
        e = live._replace(stamp=self._next_stamp(cur), preferred=bool(preferred), since=0)
        del self._local[key]
        self._local[key] = e
        return self._local_write(key, e, cur)

    def reincarnate(self, incarnation: int) -> Delta:
        """Recover from being (wrongly) declared dead without restarting: move this replica's own
        entries to a new, greater incarnation. Returns the re-stamped live entries to push."""
        owner = self._require_owner()
        _check_counter("incarnation", incarnation)
        if incarnation <= self.incarnation:
            raise ValueError("the new incarnation must be greater than the current one")
        touched: dict[bytes, Owner | None] = {}
        old, self.incarnation = self.incarnation, incarnation
        self._mark_dead(owner, old, touched)
        out: list[Record] = []
        for key, live in list(self._local.items()):
            cur = self._slot(key, owner)
            e = live._replace(incarnation=incarnation, stamp=self._next_stamp(cur), since=live.since or live.stamp)
            self._local[key] = e  # every entry re-stamped in order: the order is kept
            self._touch(touched, key)
            self._put(key, e, cur)
            out.append((key, e))
        return Delta(out, self._settle(touched))

    def take_corrections(self) -> list[Record]:
        """Records this replica wrote to refute remote claims about its own slots (see module doc);
        the transport should push them like any delta. Clears the queue."""
        out, self._corrections = self._corrections, []
        return out

    # -- merging remote state ---------------------------------------------------------------------

    def merge(self, records: Iterable[Record]) -> list[Change]:
        """Apply remote records (in any order, any number of times). Returns one Change per key
        whose resolved owner differs from before the call."""
        touched: dict[bytes, Owner | None] = {}
        max_stamp = 0
        # A record from further in the future than the clock may drift would win every slot it
        # names and outlive every horizon: refused (a broken clock, or a member making it up).
        future = (self.clock.physical_ms() + self.clock.max_drift_ms) << COUNTER_BITS | COUNTER_MASK
        for key, e in records:
            if e.stamp > future:
                self.future_rejected += 1
                continue
            if e.stamp > max_stamp:
                max_stamp = e.stamp
            self._apply(key, e, touched)
        if max_stamp:
            self.clock.update(max_stamp)
        return self._settle(touched)

    def mark_dead(self, owner: Owner, incarnation: int) -> list[Change]:
        """Declare incarnations <= `incarnation` of `owner` dead: evict their entries now and reject
        them forever. Returns the resolved-owner changes (new_owner None: PeerGone time)."""
        touched: dict[bytes, Owner | None] = {}
        self._mark_dead(owner, incarnation, touched)
        return self._settle(touched)

    def drop_owner(self, target: Owner | str, incarnation: int | None = None) -> list[Change]:
        """Membership declared a worker (`Owner`) or a whole node (its id, `str`) dead: mark dead the
        given incarnation, or else the greatest one seen, of each affected owner. Pass the
        incarnation from the heartbeats when you have it: without it, a fast restart whose new
        incarnation was already seen here would be dropped too."""
        if isinstance(target, str):
            owners = {o for o in self._max_inc if o.node == target}
            owners.update(o for o in self._by_owner if o.node == target)
            if self.owner is not None:
                owners.discard(self.owner)
        else:
            owners = {target}
        touched: dict[bytes, Owner | None] = {}
        for owner in sorted(owners):
            inc = incarnation if incarnation is not None else self._max_inc.get(owner)
            if inc is not None:
                self._mark_dead(owner, inc, touched)
        return self._settle(touched)

    # -- anti-entropy -----------------------------------------------------------------------------

    def bucket_of(self, key: bytes) -> int:
        """The anti-entropy bucket of a key (its leading bits)."""
        return int.from_bytes(key[:2], "big") >> self._bucket_shift

    def digest(self) -> bytes:
        """Per-bucket 8-byte digests, concatenated (n_buckets * 8 bytes). Equal states give equal
        digests."""
        return b"".join(h.to_bytes(DIGEST_BYTES, "big") for h in self._bucket_hash)

    def diff_buckets(self, remote_digest: bytes) -> list[int]:
        """Ids of the buckets whose digest differs from `remote_digest` (another replica's
        `digest()`). Raises DirectoryDecodeError if it is not a digest of our bucket count."""
        if not isinstance(remote_digest, bytes | bytearray | memoryview):
            raise DirectoryDecodeError("digest must be bytes")
        remote = bytes(remote_digest)
        if len(remote) != self.n_buckets * DIGEST_BYTES:
            raise DirectoryDecodeError(f"digest is {len(remote)} bytes, want {self.n_buckets * DIGEST_BYTES}")
        out: list[int] = []
        for i, h in enumerate(self._bucket_hash):
            off = i * DIGEST_BYTES
            if int.from_bytes(remote[off : off + DIGEST_BYTES], "big") != h:
                out.append(i)
        return out

    def entries_in_buckets(self, ids: Iterable[int]) -> list[Record]:
        """Every record held in the given buckets (to ship for repair)."""
        wanted = set(ids)
        for i in wanted:
            if type(i) is not int or not 0 <= i < self.n_buckets:
                raise ValueError(f"bucket id out of range: {i!r}")
        out: list[Record] = []
        for i in sorted(wanted):
            for key in self._bucket_keys.get(i, ()):
                out.extend((key, e) for e in self._slots[key].values())
        return out

    # -- garbage collection -----------------------------------------------------------------------

    def collect(self, now_ms: int) -> list[Change]:
        """Move the horizon to ``now_ms - horizon_ms`` (it never moves back) and forget every record
        stamped before it: tombstones, and remote present entries whose owner stopped refreshing
        them (see "Leases" in the module doc). This replica's own live entries are never collected
        (`refresh` keeps them young). Returns the resolved-owner changes, like `merge`."""
        if self.horizon_ms is None:
            raise RuntimeError("this Directory has no horizon_ms")
        touched: dict[bytes, Owner | None] = {}
        self._collect(now_ms - self.horizon_ms, touched)
        return self._settle(touched)

    def gc(self, older_than_ms: int, now_ms: int | None = None) -> int:
        """`collect` with an explicit horizon, ``now_ms`` defaulting to the clock's physical time.
        Returns how many records were removed."""
        now = self.clock.physical_ms() if now_ms is None else now_ms
        touched: dict[bytes, Owner | None] = {}
        removed = self._collect(now - older_than_ms, touched)
        self._settle(touched)
        return removed

    def refresh(self, now_ms: int, older_than_ms: int, limit: int = 1 << 30) -> Delta:
        """Renew the lease of this replica's own live entries stamped more than `older_than_ms`
        before `now_ms` (at most `limit` of them, oldest first): re-stamp them, keeping their order
        for `resolve` (``since``). Gossip the returned Delta like any local write. Call it often
        with ``older_than_ms`` well under ``horizon_ms`` (the module doc says how much under)."""
        owner = self._require_owner()
        cutoff = max(now_ms, wall_ms_of(self.clock.last)) - older_than_ms
        due: list[bytes] = []
        for key, live in self._local.items():  # ordered by stamp, oldest first
            if wall_ms_of(live.stamp) >= cutoff or len(due) >= limit:
                break
            due.append(key)
        out: list[Record] = []
        for key in due:
            live = self._local.pop(key)
            cur = self._slot(key, owner)
            e = live._replace(stamp=self._next_stamp(cur), since=live.since or live.stamp)
            self._local[key] = e
            if cur is None or entry_rank(e) > entry_rank(cur):
                self._put(key, e, cur)
            out.append((key, e))
        return Delta(out, [])  # `since` keeps every resolution as it was

    def _collect(self, horizon: int, touched: dict[bytes, Owner | None]) -> int:
        if horizon > self._gc_horizon_ms:
            self._gc_horizon_ms = horizon
        horizon = self._gc_horizon_ms
        expiry = self._expiry
        removed = 0
        while expiry and expiry[0][0] < horizon:
            wall, key, owner = heapq.heappop(expiry)
            e = self._slot(key, owner)
            if e is None or wall_ms_of(e.stamp) != wall:
                continue  # rewritten (a newer item is queued) or gone
            if e.present:
                if owner == self.owner and e.incarnation == self.incarnation and key in self._local:
                    continue  # our own truth: never collected, `refresh` re-queues it
                self.expired += 1
            self._touch(touched, key)
            self._evict(key, owner, e)
            removed += 1
        return removed

    # -- internals --------------------------------------------------------------------------------

    def _require_owner(self) -> Owner:
        if self.owner is None:
            raise RuntimeError("this Directory has no owner; local writes need one")
        return self.owner

    def _slot(self, key: bytes, owner: Owner) -> Entry | None:
        slots = self._slots.get(key)
        return slots.get(owner) if slots is not None else None

    def _next_stamp(self, cur: Entry | None) -> int:
        stamp = self.clock.now()
        if cur is not None and cur.stamp >= stamp:
            # let the clock adopt it (so our later stamps, and the order of `_local`, stay monotonic);
            # if it refuses (too far in the future) the slot still gets a strictly greater stamp
            stamp = self.clock.update(cur.stamp)
            if stamp <= cur.stamp:
                stamp = cur.stamp + 1
        return min(stamp, MAX_STAMP)

    def _touch(self, touched: dict[bytes, Owner | None], key: bytes) -> None:
        if key not in touched:
            touched[key] = self.resolved.get(key)

    def _local_write(self, key: bytes, e: Entry, cur: Entry | None) -> Delta:
        touched: dict[bytes, Owner | None] = {}
        if cur is None or entry_rank(e) > entry_rank(cur):
            self._touch(touched, key)
            self._put(key, e, cur)
        # else: a newer incarnation of our own owner holds the slot (we are a zombie); others will
        # reject this record too, but sending it is harmless.
        return Delta([(key, e)], self._settle(touched))

    def _apply(self, key: bytes, e: Entry, touched: dict[bytes, Owner | None]) -> None:
        owner = e.owner
        dead = self._dead.get(owner)
        if dead is not None and e.incarnation <= dead:
            return
        if e.present and wall_ms_of(e.stamp) < self._gc_horizon_ms:
            # Older than the horizon: its owner has refreshed (or removed) it since, so whatever
            # newer record says so may already be collected here; this one must not resurrect it.
            self.stale_rejected += 1
            return
        if e.incarnation > self._max_inc.get(owner, -1):
            self._max_inc[owner] = e.incarnation
        slots = self._slots.get(key)
        cur = slots.get(owner) if slots is not None else None
        if cur is not None and entry_rank(cur) >= entry_rank(e):
            return
        if owner == self.owner and e.incarnation == self.incarnation and (e.present or key in self._local):
            self._correct(key, e, cur, touched)
            return
        self._touch(touched, key)
        if not e.present and wall_ms_of(e.stamp) < self._gc_horizon_ms:
            # apply the tombstone and collect it at once
            if cur is not None:
                self._evict(key, owner, cur)
            return
        self._put(key, e, cur)

    def _correct(self, key: bytes, claim: Entry, cur: Entry | None, touched: dict[bytes, Owner | None]) -> None:
        owner = self._require_owner()
        self.clock.update(claim.stamp)
        stamp = self._next_stamp(claim)
        live = self._local.get(key)
        if live is not None:
            fix = live._replace(stamp=stamp, since=live.since or live.stamp)
            del self._local[key]
            self._local[key] = fix
        else:
            fix = Entry(owner, self.incarnation, claim.epoch, stamp, False, False)
        self._touch(touched, key)
        self._put(key, fix, cur)
        self._corrections.append((key, fix))

    def _put(self, key: bytes, e: Entry, cur: Entry | None) -> None:
        owner = e.owner
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = {}
            b = self.bucket_of(key)
            bucket = self._bucket_keys.get(b)
            if bucket is None:
                bucket = self._bucket_keys[b] = set()
            bucket.add(key)
        slots[owner] = e
        b = self.bucket_of(key)
        h = _record_hash(key, e)
        if cur is not None:
            h ^= _record_hash(key, cur)
        else:
            self._entry_count += 1
            keys = self._by_owner.get(owner)
            if keys is None:
                keys = self._by_owner[owner] = set()
            keys.add(key)
        self._bucket_hash[b] ^= h
        if e.present:
            if cur is not None and not cur.present:
                self._tombstones.discard((key, owner))
        else:
            self._tombstones.add((key, owner))
        if e.incarnation > self._max_inc.get(owner, -1):
            self._max_inc[owner] = e.incarnation
        heapq.heappush(self._expiry, (wall_ms_of(e.stamp), key, owner))
        if len(self._expiry) > 8 * self._entry_count + 4096:
            self._rebuild_expiry()

    def _rebuild_expiry(self) -> None:
        self._expiry = [(wall_ms_of(e.stamp), k, o) for k, slots in self._slots.items() for o, e in slots.items()]
        heapq.heapify(self._expiry)

    def _evict(self, key: bytes, owner: Owner, cur: Entry) -> None:
        slots = self._slots[key]
        del slots[owner]
        b = self.bucket_of(key)
        self._bucket_hash[b] ^= _record_hash(key, cur)
        if not slots:
            del self._slots[key]
            bucket = self._bucket_keys[b]
            bucket.discard(key)
            if not bucket:
                del self._bucket_keys[b]
        keys = self._by_owner[owner]
        keys.discard(key)
        if not keys:
            del self._by_owner[owner]
        if not cur.present:
            self._tombstones.discard((key, owner))
        self._entry_count -= 1

    def _mark_dead(self, owner: Owner, incarnation: int, touched: dict[bytes, Owner | None]) -> None:
        _check_counter("incarnation", incarnation)
        if owner == self.owner and incarnation >= self.incarnation:
            raise ValueError("cannot declare this replica's own live incarnation dead; see reincarnate")
        if incarnation <= self._dead.get(owner, -1):
            return
        self._dead[owner] = incarnation
        if self._max_inc.get(owner, -1) <= incarnation:
            self._max_inc.pop(owner, None)
        for key in list(self._by_owner.get(owner, ())):
            cur = self._slots[key][owner]
            if cur.incarnation <= incarnation:
                self._touch(touched, key)
                self._evict(key, owner, cur)

    def _resolve_now(self, key: bytes) -> Owner | None:
        slots = self._slots.get(key)
        if not slots:
            return None
        best: Owner | None = None
        best_rank: tuple[bool, int, Owner] | None = None
        for owner, e in slots.items():
            if e.present:
                rank = (e.preferred, e.since or e.stamp, owner)
                if best_rank is None or rank > best_rank:
                    best, best_rank = owner, rank
        return best

    def _settle(self, touched: dict[bytes, Owner | None]) -> list[Change]:
        changes: list[Change] = []
        resolved = self.resolved
        for key, old in touched.items():
            new = self._resolve_now(key)
            if new is None:
                resolved.pop(key, None)
            else:
                resolved[key] = new
            if new != old:
                changes.append(Change(key, old, new))
        return changes


# -- encoding -------------------------------------------------------------------------------------
#
# A message is the msgpack array  [1, owners, rows]:
#   owners: [[node: str (1..255 UTF-8 bytes), worker: uint32], ...]   (each owner once)
#   rows:   [[key: bin 32, owner_index: uint, incarnation: uint63, epoch: uint63, stamp: uint63,
#             flags: 0..3 (1 = present, 2 = preferred), (since: uint63, 0 < since < stamp)], ...]
#           (`since` only when the entry has one: a 6-element row is what older versions send)


def encode_entries(records: Iterable[Record]) -> bytes:
    """Encode records for the wire (msgpack, see the format above)."""
    owners: dict[Owner, int] = {}
    rows: list[list[Any]] = []
    for key, e in records:
        idx = owners.get(e.owner)
        if idx is None:
            idx = owners[e.owner] = len(owners)
        flags = (_FLAG_PRESENT if e.present else 0) | (_FLAG_PREFERRED if e.preferred else 0)
        row = [bytes(key), idx, e.incarnation, e.epoch, e.stamp, flags]
        if e.since:
            row.append(e.since)
        rows.append(row)
    table = [[o.node, o.worker] for o in owners]
    return msgpack.packb([WIRE_VERSION, table, rows], use_bin_type=True)


def _uint(value: object, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit


def _unpack(data: object) -> object:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DirectoryDecodeError("message must be bytes")
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage; the caller wants one
        raise DirectoryDecodeError(f"not msgpack: {exc}") from exc


def decode_entries(data: bytes) -> list[Record]:
    """Decode and validate `encode_entries` output. Raises DirectoryDecodeError, and nothing else,
    on any malformed input."""
    doc = _unpack(data)
    if type(doc) is not list or len(doc) != 3:
        raise DirectoryDecodeError("message is not a 3-element array")
    version, table, rows = doc
    if version != WIRE_VERSION or type(version) is not int:
        raise DirectoryDecodeError(f"unsupported message version {version!r}")
    if type(table) is not list or type(rows) is not list:
        raise DirectoryDecodeError("owners and rows must be arrays")
    owners: list[Owner] = []
    for item in table:
        if type(item) is not list or len(item) != 2:
            raise DirectoryDecodeError("owner is not a 2-element array")
        node, worker = item
        if type(node) is not str or not 0 < len(node.encode()) <= MAX_NODE_BYTES:
            raise DirectoryDecodeError("owner node must be a string of 1..255 bytes")
        if not _uint(worker, MAX_WORKER):
            raise DirectoryDecodeError("owner worker must be a uint32")
        owners.append(Owner(node, worker))
    out: list[Record] = []
    n_owners = len(owners)
    for row in rows:
        if type(row) is not list or len(row) not in (6, 7):
            raise DirectoryDecodeError("row is not a 6- or 7-element array")
        key, idx, inc, epoch, stamp, flags = row[:6]
        since = row[6] if len(row) == 7 else 0
        if type(key) is not bytes or len(key) != KEY_LEN:
            raise DirectoryDecodeError(f"key must be {KEY_LEN} bytes")
        if type(idx) is not int or not 0 <= idx < n_owners:
            raise DirectoryDecodeError("owner index out of range")
        if not (_uint(inc, MAX_COUNTER) and _uint(epoch, MAX_COUNTER) and _uint(stamp, MAX_STAMP)):
            raise DirectoryDecodeError("incarnation, epoch and stamp must be uint63")
        if len(row) == 7 and not (type(since) is int and 0 < since < stamp):
            raise DirectoryDecodeError("since must be an int in (0, stamp)")
        if not _uint(flags, _FLAG_PRESENT | _FLAG_PREFERRED):
            raise DirectoryDecodeError("flags out of range")
        out.append(
            (
                key,
                Entry(owners[idx], inc, epoch, stamp, bool(flags & _FLAG_PREFERRED), bool(flags & _FLAG_PRESENT),
                      since),
            )
        )
    return out


def encode_bucket_ids(ids: Iterable[int]) -> bytes:
    """Encode a list of bucket ids (a repair request) as msgpack."""
    return msgpack.packb(sorted(set(ids)))


def decode_bucket_ids(data: bytes, n_buckets: int) -> list[int]:
    """Decode `encode_bucket_ids` output, validating every id < n_buckets. Raises only
    DirectoryDecodeError on malformed input."""
    doc = _unpack(data)
    if type(doc) is not list or len(doc) > n_buckets:
        raise DirectoryDecodeError("bucket ids must be an array of at most n_buckets ids")
    for i in doc:
        if type(i) is not int or not 0 <= i < n_buckets:
            raise DirectoryDecodeError("bucket id out of range")
    return doc
