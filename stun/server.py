"""asyncio STUN Binding server: answer well-formed Binding requests, silently drop the rest.

One `StunServer` owns one UDP socket. Several worker processes can each run one on the same port
(SO_REUSEPORT); the kernel then spreads clients over them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Self, cast

from .codec import DropReason, respond

log = logging.getLogger(__name__)

# Not a DropReason of the codec: the codec never raises, so this only counts bugs or socket-level
# surprises (e.g. an address the codec cannot encode). Kept in the same "drops" map for one view.
INTERNAL_ERROR = "internal_error"


@dataclass(slots=True)
class StunStats:
    """`requests` counts every datagram received; each ends up in `responses` or in one `drops` key."""

    requests: int = 0
    responses: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "responses": self.responses, "drops": dict(self.drops)}


class _BindingProtocol(asyncio.DatagramProtocol):
    def __init__(self, stats: StunStats, software: str | None) -> None:
        self._stats = stats
        self._software = software
        self._transport: asyncio.DatagramTransport | None = None
        self._logged_error = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: neither asyncio's selector transport (3.11) nor uvloop's UDP
        # transport subclasses asyncio.DatagramTransport, though both implement sendto().
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        stats = self._stats
        stats.requests += 1
        try:
            out = respond(data, addr[0], addr[1], software=self._software)
            if isinstance(out, DropReason):
                stats.drops[out.value] += 1
                return
            assert self._transport is not None
            self._transport.sendto(out, addr)
            stats.responses += 1
        except Exception:
            # One bad datagram must never take the server down; count it and log the first one
            # with its traceback (not every one: a flood would otherwise flood the log too).
            stats.drops[INTERNAL_ERROR] += 1
            if not self._logged_error:
                self._logged_error = True
                log.exception("STUN handler failed for a datagram from %r", addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from earlier sends (e.g. a client that went away) are reported here on Linux.
        # They say nothing about the server's health, so they are only logged at debug level.
        log.debug("STUN socket error: %r", exc)


class StunServer:
    """A running Binding server. Use `close()` (or `async with`) to stop it."""

    def __init__(self, transport: asyncio.DatagramTransport, stats: StunStats, address: tuple[str, int]) -> None:
        self._transport = transport
        self._stats = stats
        self.address: tuple[str, int] = address  # the actual bound (host, port), also for port 0

    def stats(self) -> dict[str, Any]:
        return self._stats.as_dict()

    def close(self) -> None:
        self._transport.close()

    @property
    def closed(self) -> bool:
        return self._transport.is_closing()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _family_for(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(_family_for(host), socket.SOCK_DGRAM)
    try:
        if reuse_port:
            # Every worker process binds the same port; the kernel balances clients by 4-tuple hash.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # For "::" the platform default for IPV6_V6ONLY applies (dual-stack on Linux); IPv4 clients
        # then show up as ::ffff:a.b.c.d and the codec answers them with an IPv4 address.
        if sock.family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # Go's ":3478" is dual stack
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_stun_server(
    host: str, port: int, *, reuse_port: bool = True, software: str | None = None
) -> StunServer:
    """Bind UDP (host, port) and serve Binding requests on the running loop.

    `host` is an IP literal ("0.0.0.0", "127.0.0.1", "::", "::1"); a name is resolved first.
    `software`, if given, is sent as SOFTWARE whenever the amplification bound leaves room for it.
    """
    loop = asyncio.get_running_loop()
    if _is_ip_literal(host):
        bind_host = host
    else:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"cannot resolve {host!r}")
        bind_host = str(infos[0][4][0])
    sock = _bind_socket(bind_host, port, reuse_port)
    stats = StunStats()
    try:
        transport, _ = await loop.create_datagram_endpoint(lambda: _BindingProtocol(stats, software), sock=sock)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()
    return StunServer(transport, stats, (str(bound[0]), int(bound[1])))


def _is_ip_literal(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False
