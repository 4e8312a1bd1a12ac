"""asyncio STUN Binding client: ask a server which address and port it sees us at."""

from __future__ import annotations

import asyncio
import time
from typing import Any, NamedTuple

from .codec import DropReason, build_binding_request, new_transaction_id, parse_binding_response


class StunError(Exception):
    """No usable Binding response: timeout, unreachable port, or only bad / foreign responses."""


class StunResult(NamedTuple):
    ip: str  # the mapped (server-reflexive) address
    port: int
    rtt: float  # seconds, from the send of the attempt that was answered


class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes | Exception] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.inbox.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        # On a connected UDP socket Linux reports ICMP port-unreachable here as ConnectionRefusedError.
        self.inbox.put_nowait(exc)


async def stun_request(host: str, port: int, timeout: float = 2.0, retries: int = 2) -> StunResult:
    """Send a Binding request to (host, port) and return the mapped address.

    Makes `retries + 1` attempts, each waiting `timeout` seconds, so the call takes at most about
    `timeout * (retries + 1)`. Each attempt uses a fresh transaction id, so a late answer to an
    earlier attempt is still accepted and its RTT is measured against the right send time.
    Responses with an unknown transaction id or that do not parse are ignored (a stray datagram must
    not abort a good exchange) but are named in the StunError if nothing valid arrives.
    """
    if timeout <= 0 or retries < 0:
        raise ValueError("timeout must be > 0 and retries >= 0")
    loop = asyncio.get_running_loop()
    try:
        # A connected socket: the kernel drops datagrams from any other source for us.
        transport, protocol = await loop.create_datagram_endpoint(_ClientProtocol, remote_addr=(host, port))
    except OSError as exc:
        raise StunError(f"cannot open UDP socket to {host}:{port}: {exc}") from exc
    sent: dict[bytes, float] = {}
    last_problem = "no response"
    try:
        for _attempt in range(retries + 1):
            txid = new_transaction_id()
            sent[txid] = time.perf_counter()
            transport.sendto(build_binding_request(txid))
            deadline = loop.time() + timeout
            while (remaining := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(protocol.inbox.get(), remaining)
                except TimeoutError:
                    break
                received = time.perf_counter()
                if isinstance(item, ConnectionRefusedError):
                    raise StunError(f"{host}:{port} refused (ICMP port unreachable): nothing listening")
                if isinstance(item, Exception):
                    last_problem = f"socket error: {item!r}"
                    continue
                parsed = parse_binding_response(item)
                if isinstance(parsed, DropReason):
                    last_problem = f"bad response ({parsed.value})"
                    continue
                started = sent.get(parsed.transaction_id)
                if started is None:
                    last_problem = "response with a transaction id we never sent"
                    continue
                return StunResult(parsed.ip, parsed.port, received - started)
    finally:
        transport.close()
    attempts = f"{retries + 1} attempts of {timeout}s"
    raise StunError(f"no valid STUN response from {host}:{port} after {attempts}: {last_problem}")
