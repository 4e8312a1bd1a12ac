"""uvicorn's httptools protocol, taught to hand `Upgrade: DERP` connections to the raw DERP Protocol.

Plain DERP upgrades are not ASGI (the client may start sending frames before any response), so the
HTTP protocol detects them itself and swaps the transport over to `DerpServerConn`; every other
request, WebSocket DERP included, goes to the Starlette app as usual.
"""

from __future__ import annotations

from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .conn import DerpServerConn
from .relay import Relay

DERP_PATH = b"/derp"


def switching_protocols_response(server_public: bytes) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: DERP\r\n"
        b"Connection: Upgrade\r\n"
        b"Derp-Version: 2\r\n"
        b"Derp-Public-Key: " + server_public.hex().encode() + b"\r\n\r\n"
    )


class DerpHttpProtocol(HttpToolsProtocol):
    """Set `relay` on a subclass (see `protocol_class_for`) before handing it to uvicorn."""

    relay: Relay
    accept_gate: Any = None  # optional callable(peer) -> bool, the per-worker accept-rate limit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._derp_upgrade = False
        self._request_timer: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        gate = self.accept_gate
        if gate is not None and not gate(transport.get_extra_info("peername")):
            self.relay.stats.accept_rate_limited += 1
            transport.abort()
            return
        super().connection_made(transport)
        self._arm_request_timer()

    # uvicorn arms its keep-alive timer only after a response, and every byte received cancels it,
    # so a connection that never completes its request headers (half-open, slow-loris) would stay
    # forever. The request phase is the first step of the DERP handshake: it gets the same deadline,
    # counted from the first byte of the request and not reset by more bytes.

    def _arm_request_timer(self) -> None:
        if self._request_timer is None:
            self._request_timer = self.loop.call_later(self.relay.handshake_timeout, self._request_expired)

    def _cancel_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _request_expired(self) -> None:
        self._request_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.relay.stats.handshake_timeouts += 1
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_request_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel_request_timer()  # idle keep-alive is uvicorn's timeout_keep_alive from here

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_timer()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._cancel_request_timer()
        if (
            self.parser.should_upgrade()
            and self._get_upgrade() == b"derp"
            and httptools.parse_url(self.url).path == DERP_PATH
        ):
            self._derp_upgrade = True
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._derp_upgrade:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._derp_upgrade:
            super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.debug(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade as upgrade:
            if self._derp_upgrade:
                offset = upgrade.args[0] if upgrade.args else len(data)
                self._switch_to_derp(data[offset:])
            elif self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _switch_to_derp(self, early_frames: bytes) -> None:
        self.connections.discard(self)  # the relay owns it now, and drains it on shutdown
        headers = {name: value for name, value in self.headers}
        relay = self.relay
        fast_start = headers.get(b"derp-fast-start", b"").strip() == b"1"
        preamble = b"" if fast_start else switching_protocols_response(relay.server_public)
        conn = DerpServerConn(relay, self.client, ideal_node=b"ideal-node" not in headers, preamble=preamble)
        transport = self.transport
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if early_frames:
            conn.data_received(early_frames)


def protocol_class_for(relay: Relay, accept_gate: Any = None) -> type[DerpHttpProtocol]:
    return type("BoundDerpHttpProtocol", (DerpHttpProtocol,), {"relay": relay, "accept_gate": accept_gate})
