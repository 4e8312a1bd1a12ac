"""uvicorn's httptools protocol, hardened, and taught to hand `/derp` upgrades to DERP.

Plain DERP upgrades are not ASGI (the client may start sending frames before any response), so the
HTTP protocol detects them itself and swaps the transport over to `DerpServerConn`. WebSocket DERP
is hijacked the same way, onto `WebSocketDerp` (websocket_transport.py). Every other request goes
to the Starlette app, one at a time.

What a client can make this protocol hold is bounded (docs/SECURITY.md, "HTTP edge"):

- the request head: MAX_HEAD_BYTES in all, MAX_LINE_BYTES per line, MAX_HEADERS header lines;
  past any of them the answer is 431 and the connection is closed;
- pipelined requests: the bytes after a complete request wait (reading paused) until its response
  is written, as Go's net/http serves a connection's requests in order. A DERP or WebSocket upgrade
  behind a pipelined request is switched only after that request's response, so no HTTP response
  is ever written into the DERP stream;
- every phase has a deadline that closes the socket: READ_TIMEOUT (derper's http.Server
  ReadTimeout, 30 s) from the first byte of a request, and the same for keep-alive idle
  (derper's IdleTimeout is unset, so Go falls back to ReadTimeout). A connection whose peer does
  not read is aborted rather than left waiting for its write buffer to drain.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .conn import DerpServerConn
from .relay import Relay

DERP_PATH = b"/derp"
#: a request head larger than this is refused (Go's default is 1 MiB; no Tailscale client sends 2 KiB)
MAX_HEAD_BYTES = 64 * 1024
#: one request or header line (httptools concatenates a value delivered in pieces: keep that short)
MAX_LINE_BYTES = 8 * 1024
MAX_HEADERS = 100
#: derper's http.Server ReadTimeout/WriteTimeout
READ_TIMEOUT = 30.0
_HEAD_END = b"\r\n\r\n"
#: after a refusal, how long the client's further bytes are read and dropped (Go: rstAvoidanceDelay)
LINGER = 0.5

REQUEST_HEADER_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 35\r\n\r\n"
    b"431 Request Header Fields Too Large"
)


def switching_protocols_response(server_public: bytes) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: DERP\r\n"
        b"Connection: Upgrade\r\n"
        b"Derp-Version: 2\r\n"
        b"Derp-Public-Key: " + server_public.hex().encode() + b"\r\n\r\n"
    )


def _first(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    """Go's Header.Get: the first value, or empty."""
    for key, value in headers:
        if key == name:
            return value
    return b""


def is_ideal_node(headers: list[tuple[bytes, bytes]]) -> bool:
    """derper's handler: the client says this is not its ideal node when the first `Ideal-Node`
    value is non-empty (Go's Header.Get; textproto strips the value's surrounding blanks)."""
    return not _first(headers, b"ideal-node").strip(b" \t")


def _tls_protocol_class(loop: Any) -> Any:
    """uvloop's TLS protocol on a uvloop loop (what its create_server(ssl=) uses: C, not Python),
    else asyncio's."""
    try:
        import uvloop
        import uvloop.loop

        if isinstance(loop, uvloop.Loop):
            return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # not in uvloop's stubs
    except ImportError:
        pass
    from asyncio import sslproto

    return sslproto.SSLProtocol


def _replay(protocol: Any, data: bytes) -> None:
    """Hand bytes already read (the ClientHello the sniffer read) to the TLS protocol, as the
    transport would have: asyncio's and uvloop's SSLProtocol are buffered protocols."""
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        count = min(len(buffer), len(view))
        buffer[:count] = view[:count]
        protocol.buffer_updated(count)
        view = view[count:]


def classify_upgrade(headers: list[tuple[bytes, bytes]]) -> str:
    """What derper's /derp handler does with these headers: "ws", "derp", or "" (a 426).

    derpserver/websocket.go: `Upgrade: websocket` with "derp" *somewhere* in Sec-WebSocket-Protocol
    is WebSocket DERP; handler.go: any other `Upgrade: websocket` or `Upgrade: derp` is raw DERP
    (very early clients sent "Upgrade: WebSocket" but spoke DERP framing). Connection is not checked.
    """
    upgrade = _first(headers, b"upgrade").strip().lower()
    if upgrade == b"websocket" and b"derp" in _first(headers, b"sec-websocket-protocol"):
        return "ws"
    if upgrade in (b"websocket", b"derp"):
        return "derp"
    return ""


class DerpHttpProtocol(HttpToolsProtocol):
    """Set `relay` on a subclass (see `protocol_class_for`) before handing it to uvicorn. Without a
    relay (the plain-HTTP port) the protocol keeps its bounds and deadlines but serves no DERP."""

    relay: Relay | None
    accept_gate: Any = None  # optional callable(peer) -> bool, the per-worker accept-rate limit
    read_timeout: float = READ_TIMEOUT
    tls_context: Any = None  # ssl.SSLContext: this protocol does the TLS handshake itself (D14)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hijack = ""  # "derp" or "ws" once a /derp upgrade's headers are complete
        self._hijack_headers: list[tuple[bytes, bytes]] = []
        self._pending_switch: bytes | None = None  # early bytes of an upgrade waiting for a response
        self._deadline: Any = None
        self._idle = False  # between requests (keep-alive idle); the first request's clock starts at accept
        self._in_head = True  # the parser is in a request head (or before one)
        self._head_bytes = 0
        self._line_bytes = 0
        self._header_count = 0
        self._message_done = True
        self._held = b""  # a read with a request after a complete one, fed once its response is written
        self._held_pos = 0
        self._tail = b""  # the last bytes fed, to find a head end split across reads
        self._discarding = False  # refused: what the client still sends is dropped until we close
        self._gate_passed = False

    # -- deadlines ----------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        if not self._gate_passed:
            self._gate_passed = True
            gate = self.accept_gate
            if gate is not None and not gate(transport.get_extra_info("peername")):
                # before TLS, with a FIN, as derper's rateLimitedListener.Accept closes (D14)
                self._count("accept_rate_limited")
                transport.close()
                return
            if self.tls_context is not None:
                # TLS is ours (not uvicorn's) so that the gate above runs before the handshake:
                # the loop's own TLS protocol goes between the socket and this one, as
                # create_server(ssl=) would have put it, and calls connection_made again with the
                # TLS transport once the handshake is done. derper's ReadTimeout bounds the handshake.
                challenges = getattr(self.tls_context, "derp_hello_router", None)
                if challenges is not None:
                    # certmode letsencrypt: the ClientHello picks the context (TLS-ALPN-01, cluster/tls_alpn.py)
                    challenges.intercept(transport, self.loop, default=self.tls_context, app=self,
                                         start_tls=self._start_tls, timeout=self.read_timeout)
                    return
                self._start_tls(transport, self.tls_context, self, b"")
                return
        super().connection_made(transport)
        self._arm(self.read_timeout)

    def _start_tls(self, transport: Any, context: Any, app: Any, early: bytes) -> None:
        tls = _tls_protocol_class(self.loop)(self.loop, app, context, None, server_side=True,
                                             ssl_handshake_timeout=self.read_timeout)
        transport.set_protocol(tls)
        tls.connection_made(transport)
        if early:
            _replay(tls, early)

    def _count(self, field: str) -> None:
        relay = self.relay
        if relay is not None:
            setattr(relay.stats, field, getattr(relay.stats, field) + 1)

    def _arm(self, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None or (transport.is_closing() and not transport.get_write_buffer_size()):
            return
        if (self._idle and not self._head_bytes) or self._discarding:
            pass  # keep-alive idle, or the linger after a refusal: not a handshake failure
        else:
            self._count("handshake_timeouts")
        self._hang_up()

    def _hang_up(self) -> None:
        """Close, or abort when the peer is not reading what we wrote (close would wait forever)."""
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused by the gate, or lost during our TLS handshake: uvicorn never saw it
        self._disarm()
        self._held = b""
        super().connection_lost(exc)

    # -- parser callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_done = False
        self._header_count = 0
        if self._idle:
            self._idle = False
            self._arm(self.read_timeout)  # counted from the first byte of the request, not reset

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count <= MAX_HEADERS:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = self._line_bytes = 0
        if self._header_count > MAX_HEADERS:
            return  # answered with 431 once the feed returns
        if self.relay is not None and httptools.parse_url(self.url).path == DERP_PATH:
            kind = classify_upgrade(self.headers)
            if kind:
                self._hijack = kind
                self._hijack_headers = self.headers
                self.scope["method"] = self.parser.get_method().decode("ascii", "replace")
                return
        super().on_headers_complete()
        if self.parser.should_upgrade():
            # an Upgrade we do not speak (WebSocket off /derp, h2c, ...) is an ordinary request, as
            # in derper; what follows it is not HTTP, so the connection ends with the response
            self.cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if not self._hijack and self._header_count <= MAX_HEADERS:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._message_done = True
        self._in_head = True
        if not self._hijack and self._header_count <= MAX_HEADERS:
            super().on_message_complete()
            if self.cycle is not None and self.cycle.response_complete and not self._idle:
                self._idle = True
                self._arm(self.read_timeout)  # a body that outlived its response has ended

    def timeout_keep_alive_handler(self) -> None:
        self._hang_up()  # uvicorn's own keep-alive timer: same value as ours, but never waits on a peer

    def on_response_complete(self) -> None:
        super().on_response_complete()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._message_done:
            self._idle = True
            self._arm(self.read_timeout)  # keep-alive idle
        if self._pending_switch is not None:
            early, self._pending_switch = self._pending_switch, None
            self._switch(early)
            return
        if self._held:
            held, pos, self._held = self._held, self._held_pos, b""
            self._feed(held, pos)

    # -- reading ------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # not connected to us yet (cannot happen: the TLS protocol holds the socket until then)
        self._unset_keepalive_if_required()
        if self._discarding:
            return
        if self._held or self._pending_switch is not None:
            # reading is paused, so this is at most what was already in flight
            if self._pending_switch is not None:
                self._pending_switch += data
            else:
                self._held = self._held[self._held_pos:] + data
                self._held_pos = 0
            return
        self._feed(data, 0)

    def _feed(self, data: bytes, pos: int) -> None:
        # Feed up to and including the next head end, so that a hijack or a complete request stops
        # the parser exactly there and the rest is never parsed as HTTP (offsets, not slices of the
        # rest: many tiny pipelined requests in one read must cost linear time).
        size = len(data)
        while pos < size:
            end = -1
            if pos == 0 and self._tail:
                joined = (self._tail + data[: len(_HEAD_END) - 1]).find(_HEAD_END)
                if joined >= 0:
                    end = joined - len(self._tail)
            if end < 0:
                end = data.find(_HEAD_END, pos)
            cut = size if end < 0 else end + len(_HEAD_END)
            segment = data[pos:cut]
            pos = cut
            if self._in_head and not self._head_fits(segment):
                self._refuse_head()
                return
            self._tail = segment[-(len(_HEAD_END) - 1):]
            try:
                self.parser.feed_data(segment)
            except httptools.HttpParserUpgrade:
                pass  # on_headers_complete has decided; the parser is done with this connection
            except httptools.HttpParserError:
                msg = "Invalid HTTP request received."
                self.logger.debug(msg)
                self.send_400_response(msg)
                return
            if self._header_count > MAX_HEADERS:
                self._refuse_head()
                return
            if self._hijack:
                self._begin_switch(data[pos:])
                return
            if self.parser.should_upgrade() and self._message_done:
                self.flow.pause_reading()  # not HTTP from here; the response closes the connection
                return
            if pos < size and self._message_done and self.cycle is not None and not self.cycle.response_complete:
                # a pipelined request: wait for this response before parsing the next one
                self._held, self._held_pos = data, pos
                self.flow.pause_reading()
                return

    def _head_fits(self, segment: bytes) -> bool:
        self._head_bytes += len(segment)
        if self._head_bytes > MAX_HEAD_BYTES:
            return False
        start = 0
        while True:
            newline = segment.find(b"\n", start)
            if newline < 0:
                self._line_bytes += len(segment) - start
                return self._line_bytes <= MAX_LINE_BYTES
            if self._line_bytes + newline - start > MAX_LINE_BYTES:
                return False
            self._line_bytes = 0
            start = newline + 1

    def _refuse_head(self) -> None:
        """431, then what Go's net/http does after an error response (closeWriteAndWait): send FIN,
        discard what the client still sends for a moment, then close, so that the client reads the
        answer instead of a reset that would discard it."""
        self._count("handshake_failures")
        self.logger.debug("request head too large from %s", self.client)
        transport = self.transport
        transport.write(REQUEST_HEADER_TOO_LARGE)
        self._discarding = True
        with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
            if transport.can_write_eof():
                transport.write_eof()
        self._arm(LINGER)

    # -- the switch to DERP -------------------------------------------------------------------------

    def _begin_switch(self, early: bytes) -> None:
        self.flow.pause_reading()
        if self.cycle is not None and not self.cycle.response_complete:
            self._pending_switch = early  # after the pipelined response, in order
            return
        self._switch(early)

    def _switch(self, early: bytes) -> None:
        self._disarm()
        self._unset_keepalive_if_required()
        self.connections.discard(self)  # the relay owns it now, and drains it on shutdown
        transport = self.transport
        headers = self._hijack_headers
        relay = self.relay
        assert relay is not None  # only a protocol with a relay hijacks (on_headers_complete)
        if self._hijack == "ws":
            from .websocket_transport import WebSocketDerp

            ws = WebSocketDerp(relay, transport, self.client)
            transport.set_protocol(ws)
            self.flow.resume_reading()
            ws.handshake(self.scope["method"], self.url, headers, early)
            return
        fast_start = _first(headers, b"derp-fast-start").strip() == b"1"
        preamble = b"" if fast_start else switching_protocols_response(relay.server_public)
        conn = DerpServerConn(relay, self.client, ideal_node=is_ideal_node(headers), preamble=preamble)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        self.flow.resume_reading()
        if early:
            conn.data_received(early)


def protocol_class_for(relay: Relay | None, accept_gate: Any = None, *, read_timeout: float = READ_TIMEOUT,
                       tls_context: Any = None) -> type[DerpHttpProtocol]:
    return type("BoundDerpHttpProtocol", (DerpHttpProtocol,), {
        "relay": relay, "accept_gate": accept_gate, "read_timeout": read_timeout, "tls_context": tls_context})
