"""One DERP-mesh connection per node to each stock derper, as derper keeps one per peer
(cmd/derper/mesh.go), and the derper's key list shared with the node's other workers.

One worker of a node, the *holder*, keeps the `--mesh-with` connections (mesh.derp_peering): the
lowest-numbered worker of the node that is alive, or not yet judged, in this worker's view. Worker
0 therefore always holds while it runs; another takes over only once worker 0 has been silent for
the node's dead_after, and gives the connections back when it hears worker 0 again.

The holder sends the keys its derpers announced (PeerPresent / PeerGone) to the node's other
workers as numbered deltas over the node's ipc mesh, and says the last number in its heartbeats
(ipc is ordered per link, so a delta always arrives before the heartbeat that counts it). A worker
that sees a number it has not applied asks the holder for the whole list. The other workers send
packets for those keys to the holder, which sends them on as ForwardPacket.

Pure: callers pass `now` and what they observed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .directory import Owner
from .membership import Member


def holder(me: Owner, members: Mapping[Owner, Member], now: float, dead_after: float) -> Owner:
    """The worker of our node that holds the derper connections, as we see it.

    A lower-numbered worker of our node counts while it is alive, or while it has never been heard
    and was added less than dead_after ago (at startup every worker has yet to hear the others:
    without that grace worker 1 would open connections worker 0 holds already)."""
    best = me
    for owner, member in members.items():
        if owner.node != me.node or owner.worker >= best.worker:
            continue
        if member.alive or (not member.ever_heard and now - member.last_heard < dead_after):
            best = owner
    return best


@dataclass
class Replica:
    """The holder's derper keys as a non-holding worker knows them."""

    source: Owner | None = None
    incarnation: int = 0
    seq: int = 0
    keys: set[bytes] = field(default_factory=set)
    #: what the holder's last heartbeat said: its last delta number, and whether every derper
    #: connection has been up and watched once
    advertised: int = 0
    watched: bool = False

    def reset(self, source: Owner | None, incarnation: int = 0) -> set[bytes]:
        """Follow another holder (or incarnation of it); returns the keys no longer known."""
        gone, self.keys = self.keys, set()
        self.source, self.incarnation = source, incarnation
        self.seq = self.advertised = 0
        self.watched = False
        return gone

    def apply(self, seq: int, *, present: Iterable[bytes], gone: Iterable[bytes], full: bool,
              watched: bool | None = None) -> tuple[set[bytes], set[bytes]] | None:
        """A delta (or, with full, the whole list) numbered seq. Returns (added, removed), or None
        when a delta is missing before it (then ask for the whole list). `watched` as in the
        heartbeat, when the delta says it (the holder's first watch is sent at once, so the node's
        workers join without waiting for its next heartbeat)."""
        if watched is not None and (full or seq == self.seq + 1):
            self.watched = watched
            self.advertised = max(self.advertised, seq)
        if full:
            new = set(present)
            added, removed = new - self.keys, self.keys - new
            self.keys, self.seq = new, seq
            return added, removed
        if seq != self.seq + 1:
            return None
        self.seq = seq
        added = {key for key in present if key not in self.keys}
        self.keys |= added
        removed = {key for key in gone if key in self.keys}
        self.keys -= removed
        return added, removed

    def heartbeat(self, seq: int, watched: bool) -> bool:
        """The holder's heartbeat; True when we have missed a delta (ask for the whole list)."""
        self.advertised, self.watched = seq, watched
        return seq > self.seq

    @property
    def synced(self) -> bool:
        return self.source is not None and self.watched and self.seq >= self.advertised
