"""Run one worker: a uvicorn server on given sockets, with DERP draining on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import time
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

import uvicorn

from .http_protocol import READ_TIMEOUT, protocol_class_for
from .relay import SWEEP_INTERVAL, Relay

log = logging.getLogger("relay_worker.server")


#: derper's -tcp-user-timeout and -tcp-keepalive-time defaults (cmd/derper/derper.go)
TCP_USER_TIMEOUT = 15.0
TCP_KEEPALIVE_IDLE = 600
#: Go's keep-alive probe interval and count when only the idle time is given (net.KeepAliveConfig)
TCP_KEEPALIVE_INTERVAL = 15
TCP_KEEPALIVE_COUNT = 9


def set_tcp_timeouts(sock: socket.socket, user_timeout: float = TCP_USER_TIMEOUT,
                     keepalive_idle: int = TCP_KEEPALIVE_IDLE) -> None:
    """TCP_USER_TIMEOUT and keep-alive, as derper's listener sets them (D2). Set on the listening
    socket, Linux copies them to every accepted one: a peer that vanished is cut off 15 s after
    unacknowledged data (our 60 s DERP keepalive is such data) instead of after ~15 minutes.
    A value <= 0 leaves that option at the kernel default."""
    if keepalive_idle > 0 and hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive_idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_KEEPALIVE_COUNT)
    if hasattr(socket, "TCP_USER_TIMEOUT") and user_timeout > 0:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))


def make_listen_socket(host: str, port: int, *, reuse_port: bool = True, backlog: int = 4096,
                       user_timeout: float = TCP_USER_TIMEOUT, keepalive_idle: float = TCP_KEEPALIVE_IDLE,
                       ) -> socket.socket:
    """A listening TCP socket; SO_REUSEPORT lets every worker bind the DERP port itself. `::` is
    dual stack (IPV6_V6ONLY off), as Go's `:443`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_tcp_timeouts(sock, user_timeout, int(keepalive_idle))
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def make_unix_socket(path: str) -> socket.socket:
    import os

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class WorkerServer(uvicorn.Server):
    """uvicorn's server, draining DERP clients with Restarting frames before it stops."""

    def __init__(self, config: uvicorn.Config, relay: Relay, *, drain_timeout: float = 5.0,
                 reconnect_in_ms: int = 1000, try_for_ms: int = 30000) -> None:
        super().__init__(config)
        self.relay = relay
        self.drain_timeout = drain_timeout
        self.reconnect_in_ms = reconnect_in_ms
        self.try_for_ms = try_for_ms
        self.loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Unlike uvicorn's, ours does not re-raise the signal after a graceful stop: a drained
        # worker exits 0 so the supervisor can tell a clean stop from a crash.
        self.loop = asyncio.get_running_loop()
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.begin_drain)
        else:
            self.should_exit = True

    def begin_drain(self) -> None:
        if self.relay.draining:
            return
        count = self.relay.drain(self.reconnect_in_ms, self.try_for_ms)
        log.info("draining: sent Restarting to %d clients", count)
        self.should_exit = True

    async def wait_drained(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.relay.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in tuple(self.relay.connections):
            if conn.transport is not None:
                conn.transport.abort()


def uvicorn_config(app: Any, relay: Relay | None, *, log_level: str = "info", ssl_context: ssl.SSLContext | None = None,
                   accept_gate: Callable[[Any], bool] | None = None,
                   read_timeout: float = READ_TIMEOUT) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        # TLS is done by the protocol, after the accept gate (D14), not by uvicorn's server
        http=protocol_class_for(relay, accept_gate, read_timeout=read_timeout, tls_context=ssl_context),
        # WebSocket DERP is hijacked by the HTTP protocol (websocket_transport.py); any other
        # WebSocket upgrade is an ordinary request, as in derper's mux
        ws="none",
        ws_per_message_deflate=False,  # derper: CompressionDisabled (D10)
        proxy_headers=False,  # derper uses the TCP peer, never X-Forwarded-For (C12)
        lifespan="off",
        loop="none",
        log_level=log_level,
        access_log=False,
        server_header=False,
        timeout_keep_alive=int(max(1, read_timeout)),  # derper: IdleTimeout unset, so ReadTimeout
        timeout_graceful_shutdown=5,
    )
    config.load()
    return config


async def run_sweeper(relay: Relay) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        try:
            relay.sweep()
        except Exception:  # the sweeper must outlive any one bad connection
            log.exception("sweep failed")


async def serve(server: WorkerServer, sockets: list[socket.socket]) -> None:
    sweeper = asyncio.create_task(run_sweeper(server.relay))
    try:
        await server.serve(sockets=sockets)
        if not server.relay.draining:
            server.begin_drain()
        await server.wait_drained()
    finally:
        sweeper.cancel()
