"""ZeroMQ transport for one worker: an inbox PULL socket and one PUSH socket per peer.

Everything is non-blocking on the asyncio loop: the inbox's file descriptor is watched with
`add_reader` (no thread per socket or packet), sends use NOBLOCK, and a peer whose queue is at its
high-water mark gets its packets dropped and counted instead of stalling the sender's loop.
Packets are batched per peer and flushed once per loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import zmq

from .wire import build_packets

log = logging.getLogger("mesh.transport")

#: flush a peer's batch at once when it grows past this many bytes (bounds batching latency/memory)
MAX_BATCH_BYTES = 256 * 1024
#: messages (batches) a peer may have queued before we drop
SEND_HWM = 2000
#: inbox messages handled per loop callback before yielding to other work
READ_BUDGET = 256
#: ZMTP heartbeats on every PUSH socket: a connection that answers no PING for HEARTBEAT_TIMEOUT_MS
#: is dropped and re-made. Without them a connection stalled by a partition stays up in the
#: kernel's retransmission backoff after the network is back (tests/multihost: a 65 s cut healed
#: 42 s after the link came up); a connect or handshake that gets no answer is abandoned and retried
#: after CONNECT_TIMEOUT_MS / HANDSHAKE_IVL_MS instead of after the kernel's SYN backoff.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
CONNECT_TIMEOUT_MS = 3000
HANDSHAKE_IVL_MS = 5000


def keep_link_fresh(sock: zmq.Socket) -> None:  # type: ignore[type-arg]
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)


@dataclass
class CurveKeys:
    """A CURVE keypair (z85 bytes) and the server key a client must present to reach our inbox."""

    public: bytes
    secret: bytes
    server_public: bytes


@dataclass
class PeerLink:
    endpoint: str
    socket: zmq.Socket  # type: ignore[type-arg]
    batch: list[bytes | memoryview] = field(default_factory=list)
    batch_bytes: int = 0
    batch_packets: int = 0
    packets_sent: int = 0
    packets_dropped: int = 0
    control_dropped: int = 0


class MeshTransport:
    def __init__(
        self,
        bind: list[str],
        on_message: Callable[[bytes], None],
        *,
        curve: CurveKeys | None = None,
        context: zmq.Context | None = None,  # type: ignore[type-arg]
    ) -> None:
        self.context = context or zmq.Context.instance()
        self.on_message = on_message
        self.curve = curve
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.RCVHWM, SEND_HWM * 4)
        if curve is not None:
            self.inbox.curve_secretkey = curve.secret
            self.inbox.curve_publickey = curve.public
            self.inbox.curve_server = True
        self.bound: list[str] = []
        for endpoint in bind:
            self.inbox.bind(endpoint)
            self.bound.append(self.inbox.getsockopt_string(zmq.LAST_ENDPOINT))
        self.peers: dict[Hashable, PeerLink] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._dirty: list[PeerLink] = []
        self.messages_in = 0
        self.bad_messages = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.inbox.getsockopt(zmq.FD), self._on_readable)
        loop.call_soon(self._on_readable)  # edge-triggered FD: drain anything that raced the reader

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.inbox.getsockopt(zmq.FD))
        for link in self.peers.values():
            link.socket.close(linger=0)
        self.peers.clear()
        self.inbox.close(linger=0)

    # -- peers --------------------------------------------------------------------------------------

    def connect(self, peer: Hashable, endpoint: str, server_public: bytes | None = None) -> None:
        old = self.peers.get(peer)
        if old is not None:
            if old.endpoint == endpoint:
                return
            self.disconnect(peer)
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to live connections, so a dead peer drops
        keep_link_fresh(sock)
        if self.curve is not None:
            sock.curve_secretkey = self.curve.secret
            sock.curve_publickey = self.curve.public
            sock.curve_serverkey = server_public or self.curve.server_public
        sock.connect(endpoint)
        self.peers[peer] = PeerLink(endpoint, sock)

    def disconnect(self, peer: Hashable) -> None:
        link = self.peers.pop(peer, None)
        if link is not None:
            link.socket.close(linger=0)

    # -- sending ------------------------------------------------------------------------------------

    def queue_packet(self, peer: Hashable, head: bytes, payload: bytes | memoryview) -> bool:
        """Batch one packet for peer: its record head and payload stay separate parts until the
        batch is joined once at flush. False when there is no such peer."""
        link = self.peers.get(peer)
        if link is None:
            return False
        batch = link.batch
        if not batch:
            self._dirty.append(link)
        batch += (head, payload)
        link.batch_bytes += len(head) + len(payload)
        link.batch_packets += 1
        if link.batch_bytes >= MAX_BATCH_BYTES:
            self._flush_link(link)
        elif not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)
        return True

    def queue_records(self, link: PeerLink, records: bytes, count: int) -> None:
        """Batch `count` packet records already joined (the compiled router, relay_worker/fastpath.py)."""
        if not link.batch:
            self._dirty.append(link)
        link.batch.append(records)
        link.batch_bytes += len(records)
        link.batch_packets += count
        if link.batch_bytes >= MAX_BATCH_BYTES:
            self._flush_link(link)
        elif not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for link in dirty:
            if link.batch:
                self._flush_link(link)

    def _flush_link(self, link: PeerLink) -> None:
        batch, count = link.batch, link.batch_packets
        link.batch = []
        link.batch_bytes = link.batch_packets = 0
        try:
            link.socket.send(build_packets(batch), zmq.NOBLOCK)
            link.packets_sent += count
        except zmq.Again:
            link.packets_dropped += count
        except zmq.ZMQError as exc:
            link.packets_dropped += count
            log.debug("send to %s failed: %s", link.endpoint, exc)

    def send_control(self, peer: Hashable, message: bytes) -> bool:
        link = self.peers.get(peer)
        if link is None:
            return False
        try:
            link.socket.send(message, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            link.control_dropped += 1
            return False

    def broadcast_control(self, message: bytes) -> None:
        for peer in list(self.peers):
            self.send_control(peer, message)

    # -- receiving ----------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        inbox = self.inbox
        for _ in range(READ_BUDGET):
            try:
                # copy=False: the batch is read in place (payloads are views into it) and written
                # to clients from there, saving a copy of every forwarded packet
                message = inbox.recv(zmq.NOBLOCK, copy=False).buffer
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            self.messages_in += 1
            try:
                self.on_message(message)
            except Exception:  # one bad message must not stop the inbox
                self.bad_messages += 1
                log.exception("mesh message handler failed")
        if self.loop is not None:
            self.loop.call_soon(self._on_readable)  # more may be waiting: continue next iteration

    def stats(self) -> dict[str, int]:
        return {
            "messages_in": self.messages_in,
            "bad_messages": self.bad_messages,
            "packets_out": sum(link.packets_sent for link in self.peers.values()),
            "packets_dropped_full": sum(link.packets_dropped for link in self.peers.values()),
            "control_dropped": sum(link.control_dropped for link in self.peers.values()),
            "peers": len(self.peers),
        }
