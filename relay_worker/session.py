"""One DERP client connection on the server, sans I/O: every state transition, no socket, no loop.

`ServerSession` is fed what the socket read (`receive_data(data, now)`) and told what the socket
did (`pause_writing`, `resume_writing`, `connection_lost`) and when a deadline is due
(`handshake_timer(now)`); it writes frames to a `Transport` (seams.py: asyncio's, or a list in a
test) and reports to the `Relay` (register, publish, deliver to a key, PeerGone...). The asyncio
Protocol around it (conn.py) only feeds and drains. Time is always passed in (`now`, monotonic
seconds); the two verdicts that arrive later (admission, publication) read the injected `clock`.

States, in order (any of them may end in CLOSED):

    HANDSHAKE   ServerKey sent; waiting for ClientInfo (10 s deadline, derper's)
    ADMITTING   ClientInfo opened; waiting for the admission verdict, reading paused
    PUBLISHING  admitted and registered; waiting until the node can route to the key
                (ServerInfo must be the first frame after ServerKey: output and input are held)
    ACTIVE      ServerInfo sent; frames are relayed

The hot path is `receive_data` -> SendPacket -> `Relay.clients.get(dst)` -> `deliver_frames`,
which does one dict lookup per relayed packet and one `transport.write` per destination per read.
The transport's high-water mark is 0 (conn.py): as soon as a write leaves bytes the kernel did not
take, the session is paused and frames queue here until the transport has flushed everything
(derper's one write in flight per client). Data packets go to two bounded queues (disco and other,
32 each, drop oldest, as derper's sendPkt); control frames (PeerPresent, PeerGone, KeepAlive, Pong)
go to a queue of their own that is never trimmed (derper-parity.md B1, D12). What bounds memory is
the write deadline: a connection whose transport has held unflushed bytes for longer than 2 s (30 s
for mesh peers) is dropped by `Relay.sweep`, so every write carries derper's deadline.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import frames as F
from .frames import Payload
from .handshake import ClientInfo, ServerInfo, mesh_key_matches
from .keys import PublicKey
from .ratelimit import MIN_READ_BURST
from .seams import Client, PeerAddress, Transport
from .stats import packet_kind

if TYPE_CHECKING:
    from .fastpath import Router
    from .relay import Relay
    from .stats import WorkerStats

log = logging.getLogger("relay_worker.conn")

_recv_header = struct.Struct(">BI").pack
# derper: PeerGone(not here) at 1/s sustained with a burst of 3 per client
DISCO_PEER_GONE_PER_SEC = 1.0
DISCO_PEER_GONE_BURST = 3.0

#: Pings answered per read; the rest of a read's Pings are ignored, as derper ignores Pings while
#: a Pong is still waiting to go out (sendPongCh holds one). Bounds the work a flood costs per read.
PONGS_PER_READ = 4

HANDSHAKE, ADMITTING, PUBLISHING, ACTIVE, CLOSED = range(5)
STATE_NAMES = ("handshake", "admitting", "publishing", "active", "closed")


class ServerSession:
    __slots__ = (
        "_pending_frames",
        "box",
        "clock",
        "control",
        "disco_queue",
        "epoch",
        "handshake_deadline",
        "has_dup",
        "held_at",
        "ideal_node",
        "info",
        "is_mesh",
        "is_prober",
        "keepalive_period",
        "keepalive_slot",
        "key",
        "last_active",
        "parser",
        "paused_since",
        "peer",
        "peer_gone_stamp",
        "peer_gone_tokens",
        "pong_queued",
        "preamble",
        "preferred",
        "queue",
        "read_limit",
        "read_pongs",
        "read_preferred",
        "reading_held",
        "registered",
        "relay",
        "state",
        "tls",
        "transport",
        "unflushed_since",
        "websocket",
    )

    def __init__(self, relay: Relay, peer: PeerAddress = None, *, ideal_node: bool = True,
                 websocket: bool = False, preamble: bytes = b"",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.relay = relay
        self.clock = clock  # only for the verdicts that come back later (admission, publication)
        self.preamble = preamble  # the HTTP 101 response, sent in the same write as ServerKey
        self.box: Any = None  # the NaCl box of this client, until ServerInfo is sealed with it
        self.peer = peer
        self.ideal_node = ideal_node
        self.websocket = websocket
        self.transport: Transport | None = None
        self.parser = F.FrameParser(F.MAX_INFO_LEN)
        self.state = HANDSHAKE
        self.handshake_deadline = 0.0  # 0 once no longer in HANDSHAKE
        self.key = b""
        self.info: ClientInfo | None = None
        self.tls = False
        #: the relay's bookkeeping (seams.Client)
        self.epoch = 0
        self.registered = False
        self.has_dup = False
        self.keepalive_slot = -1
        self.keepalive_period = 0
        self.last_active = 0.0  # when this connection last sent a frame (tracked while it has a dup)
        self.preferred = False
        self.is_mesh = False
        self.is_prober = False
        #: when the transport started holding unflushed bytes (or output is held before ServerInfo)
        self.paused_since = 0.0
        self.unflushed_since = 0.0  # TLS only: when the sweep first saw bytes still buffered
        self.queue: deque[bytes] | None = None
        self.disco_queue: deque[bytes] | None = None
        #: control frames held while the transport is paused or ServerInfo is not yet out: never dropped
        self.control: list[bytes] | None = None
        self.pong_queued = False
        self.held_at = 0.0
        self.read_pongs = 0  # Pongs written for the current read
        self.read_preferred: bool | None = None  # the last NotePreferred of the current read
        self.reading_held = False  # we paused reading until ServerInfo is out
        self.peer_gone_tokens = DISCO_PEER_GONE_BURST
        self.peer_gone_stamp = 0.0
        self.read_limit: Any = None  # the client's relayed-bytes token bucket (ratelimit.py owns it)
        self._pending_frames: list[tuple[int, memoryview]] | None = None

    # -- what the socket did --------------------------------------------------------------------------

    def start(self, transport: Transport, now: float, *, tls: bool = False) -> None:
        """The connection is up: send ServerKey (after the HTTP 101, in one write) and start the
        handshake deadline."""
        self.transport = transport
        self.tls = tls
        relay = self.relay
        relay.connection_opened(self)
        transport.write(self.preamble + relay.server_key_frame if self.preamble else relay.server_key_frame)
        self.preamble = b""
        self.handshake_deadline = now + relay.handshake_timeout

    def receive_data(self, data: Payload, now: float) -> int | None:
        """Handle what one read returned. Returns the bytes to charge against the client's read
        limit (derper charges each frame's length, no header, clamped to one full SendPacket), or
        None when the relay has no limit or the read held no complete frame."""
        relay = self.relay
        router = relay.router if self.state == ACTIVE else None
        try:
            frames = self.parser.feed(data, None if router is None else router.route)
        except F.ProtocolError as exc:
            if router is not None:
                router.clear()  # as without the router: nothing of a read that ends in an error
            self._protocol_error(str(exc))
            return None
        charged = 0
        if router is not None:
            if self.has_dup and (frames or router.pending):
                relay.note_activity(self, now)
            # a read of packets to local clients only (the common case) never enters the Python loop
            charged = self._handle_frames(frames, now, router) if frames else self._deliver_routed(router)
        elif self.state == ACTIVE:
            if self.has_dup and frames:
                relay.note_activity(self, now)
            self._handle_frames(frames, now)
        else:
            self._handle_handshake_frames(frames, now)
        if relay.token_bucket_rate and (frames or charged):
            return charged + sum(min(len(payload), MIN_READ_BURST) for _, payload in frames)
        return None

    def handshake_timer(self, now: float) -> None:
        """The handshake deadline may be due: close a client that has not sent its ClientInfo."""
        if self.state == HANDSHAKE and now >= self.handshake_deadline:
            self.relay.stats.handshake_timeouts += 1
            self.close_with("handshake timed out")

    def pause_writing(self, now: float) -> None:
        # the write deadline runs from the first unflushed byte (the hold before ServerInfo may
        # already have set paused_since; keep the older stamp)
        if not self.paused_since:
            self.paused_since = now
        self.relay.paused.add(self)

    def resume_writing(self) -> None:
        self.relay.paused.discard(self)
        if self.state == ACTIVE:
            self._flush_held()
        # before ServerInfo nothing may be written: _published flushes once it is out

    def connection_lost(self) -> None:
        self.state = CLOSED
        self.handshake_deadline = 0.0
        self._drop_queued("gone_disconnected")
        self.relay.connection_closed(self)
        self.transport = None

    def _flush_held(self) -> None:
        """The transport has flushed everything: write what was held, in one write. Control frames
        first (derper's sendLoop serves them alongside packets, and they are what steers clients),
        then disco, then other packets. If the kernel does not take it all, the transport pauses
        again from inside this write and the deadline starts over."""
        self.paused_since = 0.0
        transport = self.transport
        if transport is None:
            return
        parts: list[bytes] = []
        stats = self.relay.stats
        control = self.control
        if control:
            parts += control
            self.control = None
            if self.pong_queued:
                self.pong_queued = False
                stats.sent_pong += 1
        for queue in (self.disco_queue, self.queue):
            if queue:
                size = sum(map(len, queue))
                stats.packets_sent += len(queue)
                stats.bytes_sent += size - 37 * len(queue)
                parts += queue
                queue.clear()
        if parts:
            transport.write(b"".join(parts))

    # -- handshake ----------------------------------------------------------------------------------

    def _handle_handshake_frames(self, frames: list[tuple[int, memoryview]], now: float) -> None:
        for index, (frame_type, payload) in enumerate(frames):
            if self.state == ACTIVE:
                self._handle_frames(frames[index:], now)
                return
            if self.state in (ADMITTING, PUBLISHING):
                assert self._pending_frames is not None
                self._pending_frames.extend(frames[index:])
                if not self.reading_held and self.transport is not None:
                    self.reading_held = True  # frames before ServerInfo: read no more until it is out
                    self.transport.pause_reading()
                return
            if self.state == CLOSED:
                return
            if frame_type != F.CLIENT_INFO:
                self._protocol_error(f"expected ClientInfo, got frame type 0x{frame_type:02x}")
                return
            self._client_info(payload)

    def _client_info(self, payload: memoryview) -> None:
        relay = self.relay
        try:
            key, info, self.box = relay.handshake.open_client_info(payload)
        except F.ProtocolError as exc:
            relay.stats.handshake_failures += 1
            self._protocol_error(str(exc))
            return
        self.key = key
        self.info = info
        self.is_mesh = mesh_key_matches(info.mesh_key, relay.mesh_key)
        # IsProber is self-declared: it tags the client in PeerPresent, but only a prober that also
        # presents the mesh key (is_mesh) is exempt from client limits.
        self.is_prober = info.is_prober
        if relay.draining:
            self.close_with("server is shutting down")
            return
        if relay.max_clients and relay.stats.current_connections >= relay.max_clients and not self.is_mesh:
            relay.stats.refused_clients += 1
            self.close_with("worker is at its client limit", level=logging.WARNING)
            return
        admission = relay.admission
        if admission is None or self.is_mesh:
            self.admitted(True, "")
            return
        self.state = ADMITTING
        # derper's 10 s deadline bounds the handshake's I/O only; admission has its own timeouts
        self.handshake_deadline = 0.0
        self._pending_frames = []
        if self.transport is not None:
            self.reading_held = True
            self.transport.pause_reading()
        admission(self, self.admitted)

    def admitted(self, allowed: bool, reason: str) -> None:
        """The verdict on this client (maybe later, from the admission policy)."""
        if self.state == CLOSED or self.transport is None:
            return
        relay = self.relay
        if not allowed:
            relay.stats.refused_clients += 1
            self.close_with(f"refused: {reason}", level=logging.WARNING)
            return
        self.handshake_deadline = 0.0
        # Register first (as derper does), so the key is reachable before the client hears it is
        # connected; hold the client's output (paused_since) and input (_pending_frames) until
        # ServerInfo is out, because ServerInfo must be the first frame after ServerKey.
        self.state = PUBLISHING
        self.parser.max_frame_len = F.MAX_FRAME_LEN
        self.parser.oversize_fatal = F.SERVER_HANDLED_TYPES  # bigger frames of other types are skipped
        if self._pending_frames is None:
            self._pending_frames = []  # reading is paused only if frames arrive before ServerInfo
        self.held_at = self.clock()
        if not self.paused_since:
            self.paused_since = self.held_at
        relay.register(self)
        # ServerInfo goes out once every live worker of this node can route to the key (one ipc
        # round trip, bounded): the first packet anyone sends after it is delivered.
        relay.await_published(self.published)

    def published(self) -> None:
        """Every worker of the node can route to this key: ServerInfo, then what was held."""
        if self.state != PUBLISHING or self.transport is None:
            return
        relay = self.relay
        stats = relay.stats
        now = self.clock()
        stats.publish_waits += 1
        stats.publish_wait_seconds += now - self.held_at
        # derper sends ServerInfo{Version: 2} only: advertising a token bucket makes Go clients
        # drop their own packets (derp_client.go setSendRateLimiter); pacing stays server-side
        self.transport.write(relay.handshake.seal_server_info(self.box, ServerInfo()))
        self.box = None
        self.state = ACTIVE
        if self not in relay.paused:
            self._flush_held()  # else resume_writing does, once ServerInfo itself has gone out
        log.debug("client %s connected from %s (mesh=%s)", PublicKey(self.key).short(), self.peer, self.is_mesh)
        pending, self._pending_frames = self._pending_frames, None
        if self.state != ACTIVE:
            return
        if self.reading_held:
            self.reading_held = False
            self.transport.resume_reading()
        if pending:
            self._handle_frames(pending, now)

    # -- steady state -------------------------------------------------------------------------------

    def _handle_frames(self, frames: list[tuple[int, memoryview]], now: float, router: Router | None = None) -> int:
        """Relay a read's frames. With the compiled `router` (fastpath.py), the packets it already
        filed are delivered here too, and what they charge the read limit is returned."""
        relay = self.relay
        clients = relay.clients
        sent_to = relay.sent_to
        key = self.key
        # Packets for each destination are gathered over the whole read and written with one
        # write per destination: the send syscall, not Python, dominates a relay's CPU.
        batches: dict[Client, list[Payload]] = {}
        received = received_bytes = 0
        # a sender's window is mostly packets of one size: its RecvPacket header + source key is
        # built once per run of equal sizes, not once per packet (bench/profile_hot_path.py)
        prefix_size = -1
        prefix = b""
        charged = 0
        try:
            for frame_type, payload in frames:
                if frame_type == F.SEND_PACKET:
                    size = len(payload)
                    if size < 32 or size > 32 + F.MAX_PACKET_SIZE:
                        self._protocol_error(f"SendPacket payload of {size} bytes")
                        if router is not None:
                            router.discard_from(payload)
                        break
                    received += 1
                    received_bytes += size - 32
                    dst = bytes(payload[:32])
                    target = clients.get(dst)
                    if target is not None:
                        if size != prefix_size:
                            prefix_size = size
                            prefix = _recv_header(F.RECV_PACKET, size) + key
                        parts = batches.get(target)
                        if parts is None:
                            batches[target] = [prefix, payload[32:]]
                        else:
                            parts += (prefix, payload[32:])
                        continue
                    forwarder = relay.forwarder
                    if forwarder is not None and forwarder.forward(dst=dst, src=key, packet=payload[32:]):
                        relay.stats.packets_forwarded_out += 1
                        continue
                    self._unknown_destination(dst, payload, now)
                    continue
                self._handle_control(frame_type, payload, now)
                if self.state != ACTIVE:
                    if router is not None:
                        router.discard_from(payload)
                    break
        finally:
            if router is not None:
                charged = self._deliver_routed(router)
            stats = relay.stats
            stats.packets_received += received
            stats.bytes_received += received_bytes
            for target, parts in batches.items():
                target.deliver_frames(b"".join(parts), len(parts) // 2)
                # derper's sentTo (PeerGone when this key leaves), noted once per pair
                receivers = sent_to.get(key)
                if receivers is None or target.key not in receivers:
                    relay.note_delivery(src=key, dst=target.key)
            if self.read_pongs:
                self.read_pongs = 0
            if self.read_preferred is not None:
                # a read's NotePreferred frames cost one state change (and one directory write),
                # however many there were: only the last one can be observed anyway
                preferred, self.read_preferred = self.read_preferred, None
                if self.state == ACTIVE:
                    relay.note_preferred(self, preferred)
        return charged

    def _deliver_routed(self, router: Router) -> int:
        """Write what the compiled router filed from this read; what it charges the read limit."""
        relay = self.relay
        key = self.key
        routed, to_links, count, count_bytes, charged = router.take(key)
        stats = relay.stats
        stats.packets_received += count
        stats.bytes_received += count_bytes
        if to_links:
            forwarder = relay.forwarder
            assert forwarder is not None  # the router routes to links only once the mesh attached it
            for link, records, forwarded in to_links:
                forwarder.forward_records(link=link, records=records, count=forwarded)
                stats.packets_forwarded_out += forwarded
        sent_to = relay.sent_to
        for target, data, frames in routed:
            target.deliver_frames(data, frames)
            # derper's sentTo (PeerGone when this key leaves), noted once per pair
            receivers = sent_to.get(key)
            if receivers is None or target.key not in receivers:
                relay.note_delivery(src=key, dst=target.key)
        return charged

    def _handle_control(self, frame_type: int, payload: memoryview, now: float) -> None:
        """Every frame but SendPacket: rare next to packets, so clarity over speed here."""
        relay = self.relay
        if frame_type == F.PING:
            self._ping(payload)
        elif frame_type == F.NOTE_PREFERRED:
            if len(payload) != 1:
                self._protocol_error(f"NotePreferred of {len(payload)} bytes")
                return
            self.read_preferred = F.parse_note_preferred(payload)  # applied once, at the end of the read
        elif frame_type == F.PONG:
            pass  # answers to our pings; we do not send any yet
        elif frame_type == F.FORWARD_PACKET:
            if not self._require_mesh("ForwardPacket"):
                return
            try:
                src, dst, packet = F.parse_forward_packet(payload)
            except F.ProtocolError as exc:
                self._protocol_error(str(exc))
                return
            # counted in packets_forwarded_in only, as derper does (not in packets_received)
            if not relay.deliver_forwarded(dst=dst, src=src, packet=packet, from_derp_mesh=True):
                # derper answers the forwarding mesh peer, so it drops its stale forwarder
                self._not_here(dst, packet, now)
        elif frame_type == F.WATCH_CONNS:
            if payload:
                self._protocol_error(f"WatchConns with {len(payload)} bytes of payload")
                return
            if not self._require_mesh("WatchConns"):
                return
            relay.add_watcher(self)
        elif frame_type == F.CLOSE_PEER:
            if not self._require_mesh("ClosePeer"):
                return
            try:
                relay.close_peer(F.parse_close_peer(payload))
            except F.ProtocolError as exc:
                self._protocol_error(str(exc))
                return
        # every other type, known or not, is skipped as derper's handleUnknownFrame does (its
        # unknown_frames counter is never incremented; ours counts, C14)
        else:
            relay.stats.unknown_frames += 1

    def _unknown_destination(self, dst: bytes, payload: memoryview, now: float) -> None:
        packet = payload[32:]
        self.relay.stats.drop("unknown_dest", kind=packet_kind(packet), size=len(packet))
        self._not_here(dst, packet, now)

    def _not_here(self, dst: bytes, packet: Payload, now: float) -> None:
        """derper's requestPeerGoneWriteLimited: PeerGone(NotHere) for disco packets only, at most
        1/s with a burst of 3 per connection."""
        if not F.looks_like_disco(packet):
            return
        allowed, self.peer_gone_tokens = take_token(self.peer_gone_tokens, self.peer_gone_stamp, now)
        self.peer_gone_stamp = now
        if not allowed:
            return
        self.relay.stats.peer_gone_not_here_frames += 1
        self.send_frame(F.build_peer_gone(dst, F.PEER_GONE_NOT_HERE))

    def _ping(self, payload: memoryview) -> None:
        try:
            data = F.parse_ping(payload)
        except F.ProtocolError as exc:
            self._protocol_error(str(exc))
            return
        stats = self.relay.stats
        stats.got_ping += 1
        if self.read_pongs >= PONGS_PER_READ:
            return  # a flood of Pings: ignored, as derper does when it cannot answer as fast
        self.read_pongs += 1
        if self.paused_since:
            # derper's sendPongCh holds one pong: while one waits, further pings are ignored
            if self.pong_queued:
                return
            self.pong_queued = True  # counted in sent_pong when it is written (_flush_held)
            self._hold_control(F.build_pong(data))
            return
        if self.transport is not None:
            self.transport.write(F.build_pong(data))
            stats.sent_pong += 1

    def _require_mesh(self, what: str) -> bool:
        if self.is_mesh:
            return True
        self._protocol_error(f"{what} needs the mesh key")
        return False

    # -- output (seams.Client: what the relay calls) --------------------------------------------------

    def deliver_frames(self, frames: bytes, count: int) -> None:
        """Write `count` RecvPacket frames joined in one bytes object in one write, or queue them one
        by one (bounded, drop oldest) while the client is not reading."""
        if self.paused_since:
            view = memoryview(frames)
            pos = 0
            for _ in range(count):
                stop = pos + F.HEADER_LEN + int.from_bytes(view[pos + 1 : pos + F.HEADER_LEN])
                self._deliver_frame(bytes(view[pos:stop]))
                pos = stop
            return
        transport = self.transport
        stats = self.relay.stats
        if transport is None:
            stats.drop("gone_disconnected", count)
            return
        transport.write(frames)
        stats.packets_sent += count
        stats.bytes_sent += len(frames) - 37 * count

    def _deliver_frame(self, frame: bytes) -> None:
        """Hand a RecvPacket frame to this client's transport, or to the bounded queue when paused."""
        stats = self.relay.stats
        if self.paused_since:
            disco = F.looks_like_disco(memoryview(frame)[37:])
            if disco:
                queue = self.disco_queue
                if queue is None:
                    queue = self.disco_queue = deque()
            else:
                queue = self.queue
                if queue is None:
                    queue = self.queue = deque()
            enqueue_packet(queue, frame, self.relay.queue_limit, stats, kind="disco" if disco else "other")
            return
        transport = self.transport
        if transport is None:
            stats.drop("gone_disconnected", kind=packet_kind(memoryview(frame)[RECV_FRAME_OVERHEAD:]),
                       size=len(frame) - RECV_FRAME_OVERHEAD)
            return
        transport.write(frame)
        stats.packets_sent += 1
        stats.bytes_sent += len(frame) - 37

    def deliver(self, *, src: bytes, packet: Payload) -> None:
        self._deliver_frame(_recv_header(F.RECV_PACKET, 32 + len(packet)) + src + packet)

    def send_frame(self, frame: bytes, *, force: bool = False) -> None:
        """Control frames: written now, or held (never dropped) while the transport is paused."""
        transport = self.transport
        if transport is None:
            return
        if not force and self.paused_since:
            self._hold_control(frame)
            return
        transport.write(frame)

    def _hold_control(self, frame: bytes) -> None:
        control = self.control
        if control is None:
            self.control = [frame]
        else:
            control.append(frame)

    def send_keepalive(self) -> None:
        if self.paused_since:
            return  # frames are already waiting to go out; derper's keepalive ticker also skips
        self.send_frame(F.KEEP_ALIVE_FRAME)

    def peer_present_frame(self) -> bytes:
        ip16 = bytes(16)
        port = 0
        if self.peer:
            try:
                addr = ipaddress.ip_address(self.peer[0])
                ip16 = (addr.ipv4_mapped or addr).packed if isinstance(addr, ipaddress.IPv6Address) else addr.packed
                if len(ip16) == 4:
                    ip16 = b"\x00" * 10 + b"\xff\xff" + ip16
                port = int(self.peer[1])
            except ValueError:
                pass
        return F.build_peer_present(self.key, ip16, port, present_flags(
            is_prober=self.is_prober, is_mesh=self.is_mesh, not_ideal=not self.ideal_node and not self.websocket))

    # -- closing ------------------------------------------------------------------------------------

    def _protocol_error(self, why: str) -> None:
        self.relay.stats.protocol_errors += 1
        self.close_with(f"protocol error: {why}", level=logging.INFO)

    def close_with(self, why: str, *, level: int = logging.DEBUG, quiet: bool = False) -> None:
        if not quiet:
            who = PublicKey(self.key).short() if self.key else "unidentified client"
            log.log(level, "closing %s from %s: %s", who, self.peer, why)
        self._drop_queued("gone_disconnected")
        transport = self.transport
        if transport is not None:
            transport.close()
        if self.state != CLOSED:
            self.state = CLOSED
            if self.registered:
                self.relay.unregister(self)

    def _drop_queued(self, reason: str) -> None:
        """Packets still queued for a client that is going away are dropped, and counted."""
        queued = len(self.queue or ()) + len(self.disco_queue or ())
        if queued:
            self.relay.stats.drop(reason, queued)
        self.queue = self.disco_queue = None
        self.control = None

    def abort_with(self, why: str) -> None:
        log.info("dropping %s from %s: %s", PublicKey(self.key).short() if self.key else "?", self.peer, why)
        self._drop_queued("write_error")
        transport = self.transport
        if self.state != CLOSED:
            self.state = CLOSED
            if self.registered:
                self.relay.unregister(self)
        if transport is not None:
            transport.abort()


#: a queued RecvPacket frame is header (5) + source key (32) + the packet
RECV_FRAME_OVERHEAD = 5 + 32


def enqueue_packet(queue: deque[bytes], frame: bytes, limit: int, stats: WorkerStats, *, kind: str = "other") -> None:
    """derper's sendPkt: up to 3 tries to append, dropping the head (queue_head) each time the queue
    is full; if it is still full, the new packet is dropped (queue_tail). With one thread per worker
    the first head drop always makes room, so queue_tail is counted only if limit is 0."""
    for _ in range(3):
        if len(queue) < limit:
            queue.append(frame)
            return
        if queue:
            stats.drop("queue_head", kind=kind, size=len(queue.popleft()) - RECV_FRAME_OVERHEAD)
    stats.drop("queue_tail", kind=kind, size=len(frame) - RECV_FRAME_OVERHEAD)


def take_token(tokens: float, stamp: float, now: float, *, rate: float = DISCO_PEER_GONE_PER_SEC,
               burst: float = DISCO_PEER_GONE_BURST) -> tuple[bool, float]:
    """A token bucket step: (allowed, tokens left) for a bucket last updated at stamp."""
    tokens = min(burst, tokens + (now - stamp) * rate)
    if tokens < 1.0:
        return False, tokens
    return True, tokens - 1.0


def present_flags(*, is_prober: bool, is_mesh: bool, not_ideal: bool) -> int:
    """derper's presentFlags: IsRegular only when no other bit is set. WebSocket connections are never
    not-ideal (derper's WebSocket handler does not look at Ideal-Node)."""
    flags = 0
    if is_prober:
        flags |= F.PEER_PRESENT_IS_PROBER
    if is_mesh:
        flags |= F.PEER_PRESENT_IS_MESH_PEER
    if not_ideal:
        flags |= F.PEER_PRESENT_NOT_IDEAL
    return flags or F.PEER_PRESENT_IS_REGULAR
