"""Until a worker has joined its mesh, the clients it admits wait for that before ServerInfo.

A client that has received ServerInfo must be reachable from every node of its region (within
100 ms: derpprobe waits that long before its cross-node mesh probe). In a running region that
holds because a new key's delta goes to every member at once. Right after a worker starts it does
not: for the first second or so it does not yet know the other nodes' workers (it learns them from
its seed's heartbeat, they learn it from its own), nor they it, so the deltas of keys registered on
either side go nowhere and are repaired only by anti-entropy, up to a few heartbeats later.
derpprobe run against a region right after a node (re)started lost exactly those packets.

So a worker holds ServerInfo of its new connections until it has *joined*:

- it has heard from a worker of another node, if it was given seeds (`--join`), so it knows the
  region's members;
- every member it knows has sent it a heartbeat that lists it among the members that member hears
  (so deltas flow both ways), and their directories have met: that heartbeat's digest equalled
  ours, or that member's anti-entropy repair has been merged;
- every stock derper it meshes with (`--mesh-with`) has been connected and watched once;

or until `timeout` has passed since the worker started (a seed or a derper that is down delays
only the handshakes of the worker's first seconds, never later ones). Once joined, a worker never
holds again: members that come later are the ones that wait, on their own side.

Pure: callers pass `now` and what they observed; the gate only keeps score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Set
from typing import Generic, TypeVar

Member = TypeVar("Member")


class JoinGate(Generic[Member]):
    def __init__(self, now: float, timeout: float) -> None:
        self.deadline = now + timeout
        self.joined = False
        #: members that list us in their heartbeat, whose digest matched ours, whose repair we merged
        self._listed: set[Member] = set()
        self._matched: set[Member] = set()
        self._repaired: set[Member] = set()
        self._waiting: list[Callable[[], None]] = []
        #: True when the deadline, not the mesh, ended the wait (for the log and varz)
        self.timed_out = False

    def hold(self, callback: Callable[[], None]) -> bool:
        """Park callback until joined; False (call it yourself) once the worker has joined."""
        if self.joined:
            return False
        self._waiting.append(callback)
        return True

    def heartbeat(self, member: Member, *, lists_us: bool, same_digest: bool) -> None:
        if lists_us:
            self._listed.add(member)
        if same_digest:
            self._matched.add(member)

    def repaired(self, member: Member) -> None:
        self._repaired.add(member)

    def synced(self, member: Member) -> bool:
        return member in self._listed and (member in self._matched or member in self._repaired)

    def check(self, now: float, *, members: Iterable[Member], seeds_heard: bool, derpers_watched: bool
              ) -> list[Callable[[], None]]:
        """Joined now? Returns the parked callbacks to run (once), else []."""
        if self.joined:
            return []
        ready = seeds_heard and derpers_watched and all(self.synced(m) for m in members)
        if not ready and now < self.deadline:
            return []
        self.joined = True
        self.timed_out = not ready
        waiting, self._waiting = self._waiting, []
        self._listed = self._matched = self._repaired = set()
        return waiting

    def pending(self, members: Set[Member]) -> list[Member]:
        """Members not synced yet (for the log when the deadline ends the wait)."""
        return [m for m in members if not self.synced(m)]

    @property
    def held(self) -> int:
        return len(self._waiting)
