"""One DERP client connection on the server: the asyncio Protocol around a `ServerSession`.

Everything the connection decides lives in session.py; this shell feeds it what the socket read,
tells it what the transport did, runs the two timers that need the loop (the handshake deadline
and the read limit's resume, ratelimit.py), and sets the transport's buffer limits.
"""

from __future__ import annotations

import asyncio
import contextlib
from time import monotonic
from typing import Any

from .ratelimit import apply_read_limit, cancel_read_limit
from .relay import Relay
from .seams import PeerAddress
from .session import ServerSession

#: pause as soon as anything is left unflushed, resume once all of it is (derper: one write in flight)
WRITE_HIGH_WATER = 0
WRITE_LOW_WATER = 0
#: the buffer limits of transports that do their own buffering (TLS, WebSocket), unchanged
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class DerpServerConn(asyncio.Protocol):
    __slots__ = ("session", "timer")

    def __init__(self, relay: Relay, peer: PeerAddress = None, *, ideal_node: bool = True,
                 websocket: bool = False, preamble: bytes = b"") -> None:
        self.session = ServerSession(relay, peer, ideal_node=ideal_node, websocket=websocket, preamble=preamble)
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        session = self.session
        if session.peer is None:
            session.peer = transport.get_extra_info("peername")
        # Over TLS, asyncio's SSL layer re-checks its limits only when the TCP transport under it
        # pauses or resumes: with limits of 0 a connection would pause at its first buffered byte
        # and never resume. TLS connections keep limits above the TCP layer's and get the write
        # deadline from the relay's sweep instead (Relay.sweep, by their buffered size).
        tls = transport.get_extra_info("ssl_object") is not None
        high, low = (HIGH_WATER, LOW_WATER) if tls else (WRITE_HIGH_WATER, WRITE_LOW_WATER)
        with contextlib.suppress(AttributeError, NotImplementedError):
            transport.set_write_buffer_limits(high=high, low=low)
        session.start(transport, monotonic(), tls=tls)
        self.timer = asyncio.get_running_loop().call_later(session.relay.handshake_timeout, self._handshake_due)

    def data_received(self, data: bytes) -> None:
        session = self.session
        charged = session.receive_data(data, monotonic())
        if charged is not None:
            apply_read_limit(session, charged, session.relay)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        cancel_read_limit(self.session)
        self.session.connection_lost()

    def pause_writing(self) -> None:
        self.session.pause_writing(monotonic())

    def resume_writing(self) -> None:
        self.session.resume_writing()

    def _handshake_due(self) -> None:
        # the loop's timer is this deadline's clock (as in aioquic's shell): it is due now
        self.timer = None
        session = self.session
        session.handshake_timer(max(monotonic(), session.handshake_deadline))
