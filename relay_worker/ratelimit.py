"""Rate limits of a worker: a pure token bucket, the per-worker accept gate, and the per-client read
limit (derper's --rate-config semantics: frame lengths charged, burst at least 65,568 bytes; never
announced to the client, as derper does not).

Nothing here drops packets. A client over its byte budget simply stops being read until the budget
refills, so TCP flow control pushes back on its sender (derper waits on its limiter in the read loop
the same way). An accept over the per-worker rate is aborted before any HTTP is parsed, which is the
cheapest refusal there is.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from .seams import Transport


class TokenBucket:
    """`rate` tokens per second, at most `burst` banked. Pure: callers pass `now` (monotonic seconds).

    Two ways to spend: `take` refuses when the tokens are not there (admission-style limits), while
    `debit` always spends and may go into debt, returning how long until the debt is paid back. The
    read limit needs the second form because by the time a socket read is counted it has happened.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float = 0.0, *, tokens: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("token bucket rate must be > 0")
        if burst <= 0:
            raise ValueError("token bucket burst must be > 0")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = self.burst if tokens is None else float(tokens)
        self.stamp = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        # A clock that steps backwards (it should not: callers use monotonic time) earns nothing.

    def take(self, n: float, now: float) -> bool:
        """Spend n tokens if they are all there; otherwise spend nothing and return False."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def debit(self, n: float, now: float) -> float:
        """Spend n tokens even into debt; return the seconds until the balance is back to zero."""
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def delay_for(self, n: float, now: float) -> float:
        """Seconds until n tokens will be available (0 if they are now). Spends nothing."""
        self._refill(now)
        missing = n - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate


class AcceptLimiter:
    """Per-worker accept rate, usable as `protocol_class_for(relay, accept_gate=...)`.

    Mirrors derper's --accept-connection-limit / --accept-connection-burst (a token bucket on new
    connections), plus an optional bucket per source IP so one flooding address cannot use up the
    worker's whole budget and lock everyone else out. The gate is called with the peer address of
    every new connection on every socket the worker serves; connections without an IP peer come from
    the worker's admin unix socket (the supervisor and `cluster status`) and are never limited, so a
    flood cannot blind the operator.
    """

    #: source addresses tracked at once; the oldest is forgotten first (a flood of spoofed-looking
    #: distinct sources then degrades to the global bucket, which still holds)
    MAX_SOURCES = 65536

    def __init__(self, rate_per_s: float, burst: int = 0, *, per_ip_rate: float = 0.0, per_ip_burst: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s < 0 or per_ip_rate < 0 or (rate_per_s == 0 and per_ip_rate == 0):
            raise ValueError("accept rate must be > 0 (leave the limiter out for unlimited)")
        # derper's burst defaults to "unlimited"; our config's 0 means "unset". A bucket with no room
        # would refuse everything, so an unset burst becomes one second's worth (at least 1).
        self.rate = float(rate_per_s)
        self.burst = (int(burst) if burst > 0 else max(1, math.ceil(rate_per_s))) if rate_per_s else 0
        self.per_ip_rate = float(per_ip_rate)
        self.per_ip_burst = int(per_ip_burst) if per_ip_burst > 0 else max(1, math.ceil(per_ip_rate))
        self.clock = clock
        self.bucket = TokenBucket(self.rate, self.burst, clock()) if self.rate else None
        self.sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self.accepted = 0
        self.refused = 0
        self.refused_per_ip = 0

    @classmethod
    def from_settings(cls, limit: float, burst: int, per_ip: float = 0.0) -> AcceptLimiter | None:
        """The limiter for `limits.accept_connection_limit/burst/limit_per_ip`, or None when off."""
        limit = 0.0 if not limit or math.isinf(limit) or limit < 0 else limit
        per_ip = 0.0 if not per_ip or math.isinf(per_ip) or per_ip < 0 else per_ip
        if not limit and not per_ip:
            return None
        return cls(limit, burst, per_ip_rate=per_ip)

    def __call__(self, peername: Any) -> bool:
        if not isinstance(peername, tuple) or not peername:
            return True  # unix-socket admin connection
        now = self.clock()
        if self.per_ip_rate:
            source = str(peername[0])
            bucket = self.sources.get(source)
            if bucket is None:
                bucket = self.sources[source] = TokenBucket(self.per_ip_rate, self.per_ip_burst, now)
                if len(self.sources) > self.MAX_SOURCES:
                    self.sources.popitem(last=False)
            else:
                self.sources.move_to_end(source)
            if not bucket.take(1, now):
                self.refused += 1
                self.refused_per_ip += 1
                return False
        if self.bucket is not None and not self.bucket.take(1, now):
            self.refused += 1
            return False
        self.accepted += 1
        return True

    def stats(self) -> dict[str, float]:
        return {"rate": self.rate, "burst": self.burst, "per_ip_rate": self.per_ip_rate,
                "accepted": self.accepted, "refused": self.refused, "refused_per_ip": self.refused_per_ip,
                "sources": len(self.sources)}


# -- per-client read limit ----------------------------------------------------------------------------

#: derper's minRateLimitTokenBucketSize: the burst is never below one full SendPacket (key + packet),
#: and no frame is charged more than that
MIN_READ_BURST = (64 << 10) + 32


def effective_read_limit(rate: int, burst: int) -> tuple[int, int]:
    """derper's UpdateRateLimits: rate 0 disables; otherwise the burst is raised to MIN_READ_BURST."""
    if rate <= 0:
        return 0, 0
    return rate, max(burst, MIN_READ_BURST)


def load_rate_config(path: str) -> tuple[int, int]:
    """Read derper's `--rate-config` JSON ({"PerClientRateLimitBytesPerSec": N,
    "PerClientRateBurstBytes": M}; Go's JSON: names case-insensitive, unsigned integers) and return
    the effective (rate, burst). Raises ValueError with a one-line reason."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"error reading rate config: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ValueError(f"error parsing rate config: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("error parsing rate config: not a JSON object")
    folded = {name.lower(): value for name, value in doc.items()}
    values = []
    for name in ("PerClientRateLimitBytesPerSec", "PerClientRateBurstBytes"):
        value = folded.get(name.lower(), 0)
        if value is None:
            value = 0
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
            raise ValueError(f"error parsing rate config: {name} is not an unsigned integer")
        values.append(value)
    return effective_read_limit(values[0], values[1])


class ReadLimits(Protocol):
    """The relay's per-client limit (Relay.token_bucket_rate/burst; a rate of 0 is no limit)."""

    token_bucket_rate: int
    token_bucket_burst: int


class ReadLimited(Protocol):
    """A connection whose reads are limited (a ServerSession, seams.Client): the bucket lives on it."""

    read_limit: _ReadLimit | None

    @property
    def is_mesh(self) -> bool: ...

    @property
    def registered(self) -> bool: ...

    @property
    def transport(self) -> Transport | None: ...


class LimitedRelay(ReadLimits, Protocol):
    @property
    def connections(self) -> Iterable[ReadLimited]: ...


def set_read_limit(relay: LimitedRelay, rate: int, burst: int) -> None:
    """Apply a new per-client limit to the relay and to every existing connection's bucket (derper's
    UpdateRateLimits applies to existing clients too); rate 0 lifts it, resuming paused readers."""
    relay.token_bucket_rate, relay.token_bucket_burst = effective_read_limit(rate, burst)
    for conn in tuple(relay.connections):
        entry = conn.read_limit
        if entry is None:
            continue
        if relay.token_bucket_rate:
            entry.bucket.rate = float(relay.token_bucket_rate)
            entry.bucket.burst = float(relay.token_bucket_burst)
            entry.bucket.tokens = min(entry.bucket.tokens, entry.bucket.burst)
            continue
        resume = entry.resume
        cancel_read_limit(conn)
        if resume is not None and conn.transport is not None and conn.registered:
            conn.transport.resume_reading()


class _ReadLimit:
    __slots__ = ("bucket", "resume")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.resume: asyncio.TimerHandle | None = None


#: process-wide counters for /debug/varz (a worker is one process with one Relay)
read_limit_counters: dict[str, float] = {"pauses": 0, "paused_seconds": 0.0, "limited_connections": 0}


def apply_read_limit(conn: ReadLimited, nbytes: int, limits: ReadLimits) -> None:
    """Count nbytes just read from conn against its byte budget; pause reading while in debt.

    Call after each read with the relay's limits and what `ServerSession.receive_data` charged: the
    read's frame lengths (headers excluded, each clamped to MIN_READ_BURST), which is what derper
    charges. Connections that are
    not yet admitted and mesh peers (probers presenting the mesh key included) are not limited; with
    no rate set this returns at once. The bucket lives on the connection, so it goes when the connection goes.
    """
    rate = limits.token_bucket_rate
    if rate <= 0 or conn.is_mesh or not conn.registered:
        return
    transport = conn.transport
    if transport is None:
        return
    loop = asyncio.get_running_loop()
    now = loop.time()
    entry = conn.read_limit
    if entry is None:
        entry = conn.read_limit = _ReadLimit(TokenBucket(rate, limits.token_bucket_burst or rate, now))
        read_limit_counters["limited_connections"] += 1
    wait = entry.bucket.debit(nbytes, now)
    if wait > 0 and entry.resume is None:
        transport.pause_reading()
        read_limit_counters["pauses"] += 1
        read_limit_counters["paused_seconds"] += wait
        entry.resume = loop.call_later(wait, _resume, conn, entry)


def _resume(conn: ReadLimited, entry: _ReadLimit) -> None:
    entry.resume = None
    transport = conn.transport
    if transport is not None and conn.registered:
        transport.resume_reading()


def cancel_read_limit(conn: ReadLimited) -> None:
    """The connection closed: drop its bucket and any pending resume."""
    entry = conn.read_limit
    if entry is not None:
        conn.read_limit = None
        read_limit_counters["limited_connections"] -= 1
        if entry.resume is not None:
            entry.resume.cancel()


def read_limit_stats() -> dict[str, float]:
    return dict(read_limit_counters)
