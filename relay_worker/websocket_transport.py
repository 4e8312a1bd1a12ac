"""DERP over WebSocket, on the raw socket: the HTTP protocol hands a `/derp` WebSocket upgrade to
`WebSocketDerp`, which does the handshake with websockets' sans-I/O `ServerProtocol` and then sits
between the socket and a `DerpServerConn`, as its transport.

Why not ASGI: a WebSocket under uvicorn has its own buffers and tasks that the relay cannot see, so
a client that stopped reading was timed out by the relay but its socket never closed, a client that
flooded pings without reading the pongs grew the worker's memory without bound, and a text frame
with invalid UTF-8 logged a traceback. Here, as with raw DERP, the socket's own write buffer is what
the relay watches (pause_writing/resume_writing, the 2 s write timeout), close() really closes (and
aborts when the peer does not read), and:

- binary messages (and their continuation frames) are the DERP byte stream, as Go's wsconn reads
  them; a text message closes the connection with 1003, as wsconn does (C12);
- pongs are written only while the write buffer is below HIGH_WATER: a client whose pings fill it
  is no longer read until it drains, so what it can make us hold is bounded by HIGH_WATER plus one
  read; the relay's write timeout then drops it;
- the DERP handshake deadline (DerpServerConn's timer) applies from the 101, so a client that opens
  a WebSocket and never sends ClientInfo is closed like a raw one;
- no permessage-deflate (derper sets CompressionDisabled, D10); any Origin is accepted;
- one message may be at most MAX_MESSAGE bytes (Go streams messages of any size; DERP clients
  write one frame or a few per message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Sequence
from typing import Any

from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from .conn import HIGH_WATER, DerpServerConn
from .relay import Relay

log = logging.getLogger("relay_worker.websocket")


class _ClientInputLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs what a client got wrong (some with a traceback): keep it at debug, one line."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("exc_info", None)
        super().log(logging.DEBUG, msg, *args, **kwargs)

    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


_ws_log = _ClientInputLog(log, {})

MAX_MESSAGE = 1 << 20
#: Tailscale's WebSocket client (coder/websocket, whose default derphttp never raises) refuses a
#: message over 32 KiB and reconnects; a batch of DERP frames therefore goes out as several
#: messages (DERP frames may span messages, so where they are cut does not matter).
MAX_OUT_MESSAGE = 32 * 1024
#: after close(), how long the peer has to take our last bytes before the socket is aborted
CLOSE_GRACE = 2.0


def _frame_header(size: int) -> bytes:
    """An unmasked, final, binary frame header (RFC 6455 5.2), as a server sends."""
    if size < 126:
        return bytes((0x82, size))
    if size < 65536:
        return struct.pack("!BBH", 0x82, 126, size)
    return struct.pack("!BBQ", 0x82, 127, size)


_DERP = Subprotocol("derp")


def _select_derp(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    # as coder/websocket with Subprotocols ["derp"]: pick it when offered, else continue without one
    return _DERP if _DERP in offered else None


class WebSocketDerp(asyncio.Protocol):
    """The asyncio Protocol of the socket, and the transport its DERP session (DerpServerConn, session.py) writes to."""

    def __init__(self, relay: Relay, transport: Any, peer: Any) -> None:
        self.relay = relay
        self.transport = transport
        self.peer = peer
        self.ws = ServerProtocol(extensions=None, subprotocols=[_DERP], select_subprotocol=_select_derp,
                                 max_size=MAX_MESSAGE, logger=_ws_log)
        self.conn: DerpServerConn | None = None
        self.closing = False
        self.text_message = False  # inside a text message (its continuation frames are refused too)
        self.derp_paused = False  # the DERP session asked for reading to stop (admission)
        self.pong_paused = False  # our pongs filled the write buffer
        self.write_paused = False
        self.abort_timer: Any = None

    # -- the handshake -------------------------------------------------------------------------------

    def handshake(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], early: bytes) -> None:
        if method != "GET":
            # coder/websocket's Accept, through http.Error
            body = f"WebSocket protocol violation: handshake request method is not GET but {method!r}\n"
            self.transport.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                 b"X-Content-Type-Options: nosniff\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
            self.closing = True
            self._close_transport()
            return
        # the head was parsed and bounded by the HTTP protocol; websockets parses it again, for its
        # own checks (Sec-WebSocket-Key and -Version, Connection, Upgrade)
        head = [b"GET ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        ws = self.ws
        ws.receive_data(b"".join(head))
        requests = [event for event in ws.events_received() if isinstance(event, Request)]
        if not requests:
            self.closing = True
            self._close_transport()
            return
        response = ws.accept(requests[0])
        ws.send_response(response)
        self._flush_ws()
        if response.status_code != 101:
            self.closing = True
            self._close_transport()
            return
        if ws.subprotocol != "derp":
            self._fail(1008, "client must speak the derp subprotocol")
            return
        self.relay.stats.websocket_accepts += 1
        self.conn = DerpServerConn(self.relay, self.peer, ideal_node=True, websocket=True)
        self.conn.connection_made(self)
        if early:
            self.data_received(early)

    # -- asyncio Protocol (the socket) ---------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # not called: the HTTP protocol hands us the socket
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        conn = self.conn
        # The binary messages of one read are one piece of the DERP byte stream (frames may span
        # messages): the session gets them in one call, so a read of many one-frame messages (as
        # Tailscale's client sends) costs one write per destination, as a raw DERP read does.
        stream: list[bytes | bytearray | memoryview] = []
        for event in ws.events_received():
            if not isinstance(event, Response) and not isinstance(event, Request):
                opcode = event.opcode
                if opcode is Opcode.BINARY or (opcode is Opcode.CONT and not self.text_message):
                    self.text_message = False
                    if event.data:
                        stream.append(event.data)
                elif opcode is Opcode.TEXT or opcode is Opcode.CONT:
                    self.text_message = True
                    self._feed(conn, stream)
                    # wsconn: "unexpected frame type read (expected MessageBinary)", StatusUnsupportedData
                    self._fail(1003, "unexpected frame type read (expected MessageBinary): MessageText")
                    return
        self._feed(conn, stream)
        output = ws.data_to_send()
        if output and not self.closing:
            # pongs and our close reply; DERP data never goes through ws.send_*
            self.transport.write(b"".join(output))
            if self.transport.get_write_buffer_size() > HIGH_WATER and not self.pong_paused:
                self.pong_paused = True
                self._update_reading()
        if ws.state is State.CLOSING or ws.state is State.CLOSED or ws.parser_exc is not None:
            # the peer closed, or broke the framing (ws queued the close frame written above)
            self._close_transport()

    def _feed(self, conn: DerpServerConn | None, stream: list[bytes | bytearray | memoryview]) -> None:
        if stream and conn is not None and not self.closing:
            conn.data_received(bytes(stream[0]) if len(stream) == 1 else b"".join(stream))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.abort_timer is not None:
            self.abort_timer.cancel()
            self.abort_timer = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.pong_paused:
            self.pong_paused = False
            self._update_reading()
        if self.conn is not None:
            self.conn.resume_writing()

    # -- the transport surface the DERP session uses (seams.Transport) ---------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        return self.transport.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_size(self) -> int:
        return int(self.transport.get_write_buffer_size())

    def write(self, data: bytes) -> None:
        if self.closing or not data:
            return
        size = len(data)
        if size < 4096:
            self.transport.write(_frame_header(size) + data)
            return
        view = memoryview(data)
        parts: list[bytes | memoryview] = []
        for start in range(0, size, MAX_OUT_MESSAGE):
            chunk = view[start : start + MAX_OUT_MESSAGE]
            parts += (_frame_header(len(chunk)), chunk)
        self.transport.writelines(parts)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def pause_reading(self) -> None:
        self.derp_paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        self.derp_paused = False
        self._update_reading()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        """Close frame, then close the socket; abort if the peer does not take it (it may not read)."""
        if self.closing:
            return
        if self.ws.state is State.OPEN:
            self.ws.send_close(1000)
        self._close_transport()

    def abort(self) -> None:
        self.closing = True
        self.transport.abort()

    # -- internals ------------------------------------------------------------------------------------

    def _fail(self, code: int, reason: str) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
        self._close_transport()

    def _flush_ws(self) -> None:
        output = self.ws.data_to_send()
        if output:
            self.transport.write(b"".join(output))

    def _close_transport(self) -> None:
        if not self.closing:
            self.closing = True
            self._flush_ws()
        transport = self.transport
        if transport.is_closing() and self.abort_timer is not None:
            return
        if transport.get_write_buffer_size() > HIGH_WATER:
            transport.abort()
            return
        transport.close()
        if self.abort_timer is None:
            loop = self.relay_loop()
            self.abort_timer = loop.call_later(CLOSE_GRACE, transport.abort)

    def relay_loop(self) -> Any:
        import asyncio

        return asyncio.get_running_loop()

    def _update_reading(self) -> None:
        with contextlib.suppress(AttributeError, RuntimeError):
            if self.derp_paused or self.pong_paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()
