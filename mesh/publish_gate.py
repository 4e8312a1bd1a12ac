"""How often one client key may make this worker gossip: at most once per `interval`.

A client controls when its key's directory entry changes: NotePreferred toggles, and with two
connections of one key the active one switches on every packet the other sends. Each change is a
directory write, and each write used to be a delta to every member of the cluster: one client could
make the whole mesh busy. The directory write itself stays immediate (local routing is always
right); the gate only decides whether its gossip goes out now or is held. A held key is published
when its bucket has a token again, with whatever its entry is then (records carry whole state, so
the latest one says everything the held ones did): per key at most `burst` deltas plus one per
`interval`, and the last change is never lost, only delayed by at most interval + one tick.

Pure: the caller passes `now`; memory is bounded by the keys that published within one interval.
"""

from __future__ import annotations


class PublishGate:
    """A token bucket per key: `burst` publications at once (a connect and its NotePreferred go
    out without delay), then one per `interval`."""

    def __init__(self, interval: float, burst: int = 3) -> None:
        if interval <= 0 or burst < 1:
            raise ValueError("interval must be > 0 and burst >= 1")
        self.interval = interval
        self.burst = burst
        self._state: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, at); oldest update first
        self._held: dict[bytes, None] = {}  # keys with a write not gossiped yet
        #: writes whose gossip was held (coalesced into a later publication)
        self.held_writes = 0

    def _tokens(self, key: bytes, now: float) -> float:
        state = self._state.get(key)
        if state is None:
            return float(self.burst)
        tokens, at = state
        return min(float(self.burst), tokens + max(0.0, now - at) / self.interval)

    def _set(self, key: bytes, tokens: float, now: float) -> None:
        self._state.pop(key, None)
        self._state[key] = (tokens, now)  # moved to the end: ordered by update time

    def offer(self, key: bytes, now: float) -> bool:
        """A write to `key`'s entry: True means gossip it now; False means it is held for `due`."""
        tokens = self._tokens(key, now)
        if key not in self._held and tokens >= 1.0:
            self._set(key, tokens - 1.0, now)
            return True
        self._held[key] = None
        self.held_writes += 1
        return False

    def discard(self, key: bytes) -> None:
        """The key's entry was gossiped by other means (a removal goes out at once)."""
        self._held.pop(key, None)

    def due(self, now: float) -> list[bytes]:
        """Held keys that have a token again: gossip their current entry now."""
        out: list[bytes] = []
        for key in list(self._held):
            tokens = self._tokens(key, now)
            if tokens >= 1.0:
                del self._held[key]
                self._set(key, tokens - 1.0, now)
                out.append(key)
        # forget keys whose bucket is full again (oldest update first; stop at the first that is not)
        state = self._state
        while state:
            key = next(iter(state))
            if key in self._held or self._tokens(key, now) < self.burst:
                break
            del state[key]
        return out

    def __len__(self) -> int:
        """Keys remembered (what the memory bound is about)."""
        return len(self._state)

    @property
    def held(self) -> int:
        return len(self._held)
