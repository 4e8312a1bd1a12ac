"""Hybrid logical clock (Kulkarni et al.): physical milliseconds plus a logical counter, one int.

A stamp packs ``(wall_ms, counter)`` as ``wall_ms << COUNTER_BITS | counter``, so comparing two stamps
as plain ints compares them lexicographically, and ``stamp + 1`` is "same wall time, next counter"
(a counter overflow carries into the wall time, which is the usual way to keep stamps unique).

Pure: no I/O except reading the injected time source.
"""

from __future__ import annotations

import time
from collections.abc import Callable

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
#: stamps are unsigned 63-bit so they fit a signed int64 everywhere (msgpack, SQL, Go peers)
MAX_STAMP = (1 << 63) - 1
#: by default a remote stamp more than this far ahead of our physical clock is not adopted
DEFAULT_MAX_DRIFT_MS = 60_000


def pack(wall_ms: int, counter: int = 0) -> int:
    """Pack a wall time in ms and a logical counter into one comparable int."""
    if not 0 <= counter <= COUNTER_MASK:
        raise ValueError(f"HLC counter out of range: {counter}")
    if wall_ms < 0:
        raise ValueError(f"HLC wall time is negative: {wall_ms}")
    stamp = (wall_ms << COUNTER_BITS) | counter
    if stamp > MAX_STAMP:
        raise ValueError(f"HLC wall time out of range: {wall_ms}")
    return stamp


def unpack(stamp: int) -> tuple[int, int]:
    """Split a stamp into ``(wall_ms, counter)``."""
    return stamp >> COUNTER_BITS, stamp & COUNTER_MASK


def wall_ms_of(stamp: int) -> int:
    """The physical (wall-clock ms) part of a stamp."""
    return stamp >> COUNTER_BITS


def system_time_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


class HLC:
    """A hybrid logical clock. Every stamp it returns is strictly greater than every stamp it
    returned or observed before (unless an observed stamp was rejected for drift, see `update`).

    `time_ms` is the physical time source (injectable for tests; it may go backwards, the clock
    never does).
    """

    __slots__ = ("_last", "_time_ms", "drift_rejections", "max_drift_ms")

    def __init__(
        self,
        time_ms: Callable[[], int] = system_time_ms,
        *,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
        last: int = 0,
    ) -> None:
        self._time_ms = time_ms
        self.max_drift_ms = max_drift_ms
        #: number of remote stamps ignored because they were too far in the future
        self.drift_rejections = 0
        self._last = last

    @property
    def last(self) -> int:
        """The latest stamp issued or observed."""
        return self._last

    def physical_ms(self) -> int:
        """The time source's current reading, in ms."""
        return self._time_ms()

    def now(self) -> int:
        """A new stamp for a local event: max(physical time, last + 1)."""
        pt = self._time_ms() << COUNTER_BITS
        last = self._last
        stamp = pt if pt > last else last + 1
        self._last = stamp
        return stamp

    def update(self, remote: int) -> int:
        """Observe a remote stamp and return a stamp for the receive event, greater than both the
        remote stamp and everything before.

        A remote stamp whose wall time is more than `max_drift_ms` ahead of our physical clock is not
        adopted (a peer with a broken clock must not drag every clock in the cluster into the
        future); it is counted in `drift_rejections` and the call behaves like `now()`.
        """
        pt_ms = self._time_ms()
        if (remote >> COUNTER_BITS) > pt_ms + self.max_drift_ms:
            self.drift_rejections += 1
            return self.now()
        pt = pt_ms << COUNTER_BITS
        last = self._last
        high = last if last >= remote else remote
        stamp = pt if pt > high else high + 1
        self._last = stamp
        return stamp
