"""The seams between a connection's session, the relay, the mesh and admission, as typing Protocols.

Who calls whom (docs/ARCHITECTURE.md):

- `ServerSession` (session.py) writes to a `Transport` and calls the `Relay` (relay.py);
- the `Relay` calls every connection it routes to through `Client`, and keys held elsewhere
  through a `Forwarder` (implemented by `mesh`, wired by `cluster`);
- admission (admission.py) is an `Admission` hook: it sees an `AdmissionSubject` and answers
  through a callback, now or later.

This module imports nothing of ours but the codec's `Payload`, so none of those modules import
each other at runtime in a cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeAlias

from .frames import Payload

#: a socket's peer address as asyncio reports it ((host, port) or IPv6's 4-tuple); None when unknown
PeerAddress: TypeAlias = tuple[Any, ...] | None
#: an admission verdict: (allowed, reason); the reason is logged and counted when refused
Verdict = Callable[[bool, str], None]


class Transport(Protocol):
    """What a session needs of its byte stream: a subset of asyncio's transports, implemented by
    asyncio's and uvloop's TCP and TLS transports and by `WebSocketDerp`."""

    def write(self, data: Payload) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int: ...


class Client(Protocol):
    """What the relay needs of a connection it routes to (a `ServerSession`)."""

    #: set by the session
    key: bytes
    peer: PeerAddress
    is_mesh: bool
    preferred: bool
    tls: bool
    paused_since: float
    unflushed_since: float
    #: the relay's bookkeeping, kept on the connection so that the hot path needs no second lookup
    epoch: int
    registered: bool
    has_dup: bool
    last_active: float
    keepalive_slot: int
    keepalive_period: int
    #: the client's read budget, owned by ratelimit.py
    read_limit: Any

    @property
    def transport(self) -> Transport | None: ...

    def deliver(self, *, src: bytes, packet: Payload) -> None: ...

    def deliver_frames(self, frames: bytes, count: int) -> None:
        """`count` whole RecvPacket frames in one bytes object, written in one write."""
        ...

    def send_frame(self, frame: bytes, *, force: bool = False) -> None: ...

    def send_keepalive(self) -> None: ...

    def peer_present_frame(self) -> bytes: ...

    def close_with(self, why: str, *, quiet: bool = False) -> None: ...

    def abort_with(self, why: str) -> None: ...


class AdmissionSubject(Protocol):
    """What admission looks at: the client's key and where it connects from."""

    @property
    def key(self) -> bytes: ...

    @property
    def peer(self) -> PeerAddress: ...


class Admission(Protocol):
    """Decide on a client after its ClientInfo, before ServerInfo; call the verdict now or later."""

    def __call__(self, client: AdmissionSubject, verdict: Verdict, /) -> None: ...


class Forwarder(Protocol):
    """How a worker reaches keys it does not hold. Implemented by `mesh`, wired by `cluster`.

    The relay reports which local connection (if any) is active for each key; the forwarder
    publishes that, and calls back `Relay.reroute`, `remote_key_present` and `remote_key_gone`
    when the cluster-wide picture of a key changes.
    """

    def forward(self, *, dst: bytes, src: bytes, packet: Payload) -> bool:
        """Send to the remote owner of dst; False when no remote owner is known."""
        ...

    def forward_records(self, *, link: Any, records: bytes, count: int) -> None:
        """Send `count` packet records the compiled router built for one mesh link (fastpath.py)."""
        ...

    def remote_winner(self, key: bytes) -> bool:
        """True when another owner, not this worker, should receive packets for key."""
        ...

    def local_active_changed(self, key: bytes, epoch: int, preferred: bool, present: bool) -> None: ...

    def remote_keys(self) -> Iterable[bytes]: ...
