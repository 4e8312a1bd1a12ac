"""The relay's per-worker state: which connection serves which key, who heard from whom, watchers.

A `Relay` knows nothing about sockets: sessions (session.py) register with it and it calls back
into them through `seams.Client` (`deliver_frames`, `send_frame`, `close_with`...). Keys held by
other workers or nodes are reached through an optional `seams.Forwarder` that `cluster` wires to
`mesh`; admission is an optional `seams.Admission` hook.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from collections.abc import Callable, Iterable

from . import frames as F
from .fastpath import MeshFrames, new_router
from .frames import Payload
from .handshake import ServerHandshake
from .keys import PrivateKey
from .ratelimit import MIN_READ_BURST
from .seams import Admission, Client, Forwarder
from .stats import WorkerStats, packet_kind

__all__ = ["Forwarder", "Relay"]  # Forwarder: where mesh and tests have always imported it from

log = logging.getLogger("relay_worker.relay")
_RECV_HEADER = struct.Struct(">BI").pack

KEEPALIVE_INTERVAL = 60.0
#: derper: each connection's keepalive ticker runs at 60 s + U[0, 5 s), fixed per connection
KEEPALIVE_JITTER = 5
SWEEP_INTERVAL = 1.0
KEEPALIVE_SLOTS = int(KEEPALIVE_INTERVAL / SWEEP_INTERVAL) + KEEPALIVE_JITTER
#: derper never sends Restarting; the client doc says TryFor should be "a few seconds" at most
MAX_TRY_FOR_MS = 5000


class Relay:
    """Routing table and bookkeeping for one worker."""

    def __init__(
        self,
        server_key: PrivateKey,
        *,
        mesh_key: str = "",
        write_timeout: float = 2.0,
        mesh_write_timeout: float = 30.0,
        handshake_timeout: float = 10.0,
        queue_limit: int = 32,
        token_bucket_rate: int = 0,
        token_bucket_burst: int = 0,
        max_clients: int = 0,
    ) -> None:
        self.server_key = server_key
        self.server_public = server_key.public().raw
        self.server_key_frame = F.build_server_key(self.server_public)
        self.handshake = ServerHandshake(server_key)
        self.mesh_key = mesh_key
        self.write_timeout = write_timeout
        self.mesh_write_timeout = mesh_write_timeout
        self.handshake_timeout = handshake_timeout
        self.queue_limit = queue_limit
        self.token_bucket_rate = token_bucket_rate
        self.token_bucket_burst = token_bucket_burst
        self.max_clients = max_clients
        self.stats = WorkerStats()
        #: hot-path routing table: the connection that receives packets for each key routed here
        self.clients: dict[bytes, Client] = {}
        #: the compiled relay loop over `clients` (fastpath.py), or None for session.py's Python loop
        self.router = new_router(self.clients, min_burst=MIN_READ_BURST)
        #: the local connection chosen for each key held here (routed unless an owner elsewhere wins)
        self.active: dict[bytes, Client] = {}
        #: keys with more than one connection here: every connection of that key, oldest first
        self.dups: dict[bytes, list[Client]] = {}
        #: src key -> keys of local connections that received packets from src (for PeerGone)
        self.sent_to: dict[bytes, set[bytes]] = {}
        self.watchers: set[Client] = set()
        self.connections: set[Client] = set()
        self.paused: set[Client] = set()
        #: connections over TLS, whose write deadline the sweep checks by buffered size
        self.tls_connections: set[Client] = set()
        self.keepalive_slots: list[set[Client]] = [set() for _ in range(KEEPALIVE_SLOTS)]
        self._sweep_index = 0
        self.next_epoch = 1
        self.forwarder: Forwarder | None = None
        self.admission: Admission | None = None
        #: how a new connection waits, before ServerInfo, until every worker of the node can route
        #: to it (set by `mesh`: calls back once the others acknowledged this loop's publications)
        self.publication_barrier: Callable[[Callable[[], None]], None] | None = None
        self.draining = False

    # -- connection lifecycle ---------------------------------------------------------------------

    def connection_opened(self, conn: Client) -> None:
        self.connections.add(conn)
        if conn.tls:
            self.tls_connections.add(conn)
        self.stats.accepts += 1

    def connection_closed(self, conn: Client) -> None:
        self.connections.discard(conn)
        self.tls_connections.discard(conn)
        self.paused.discard(conn)
        self.watchers.discard(conn)
        if conn.keepalive_slot >= 0:
            self.keepalive_slots[conn.keepalive_slot].discard(conn)
        if conn.registered:
            self.unregister(conn)

    def register(self, conn: Client) -> None:
        """Make an admitted connection reachable under its key."""
        key = conn.key
        conn.epoch = self.next_epoch
        self.next_epoch += 1
        conn.registered = True
        conn.keepalive_period = int(KEEPALIVE_INTERVAL / SWEEP_INTERVAL) + random.randrange(KEEPALIVE_JITTER)
        slot = (self._sweep_index + conn.keepalive_period) % KEEPALIVE_SLOTS
        conn.keepalive_slot = slot
        self.keepalive_slots[slot].add(conn)
        self.stats.current_connections += 1
        existing = self.active.get(key)
        if existing is None:
            self._activate(key, conn)
        else:
            group = self.dups.setdefault(key, [existing])
            group.append(conn)
            self.stats.total_dup_client_conns += 1
            for other in group:
                other.has_dup = True
            self._activate(key, conn)

    def unregister(self, conn: Client) -> None:
        key = conn.key
        conn.registered = False
        self.stats.current_connections -= 1
        if conn.preferred:
            self.stats.current_home_connections -= 1
        group = self.dups.get(key)
        if group is not None:
            if conn in group:
                group.remove(conn)
            if len(group) == 1:
                del self.dups[key]
                group[0].has_dup = False
            if self.active.get(key) is conn:
                self._activate(key, _best_of(group))
            return
        if self.active.get(key) is not conn:
            return
        del self.active[key]
        self.clients.pop(key, None)
        if self.forwarder is not None:
            # The directory decides whether the key is gone from the whole node (PeerGone then
            # comes back through remote_key_gone) or still held by another owner (no PeerGone).
            self.forwarder.local_active_changed(key, conn.epoch, conn.preferred, False)
            return
        self.key_gone(key)

    def _activate(self, key: bytes, conn: Client) -> None:
        """Make conn the local connection for key, and route to it unless an owner elsewhere wins."""
        previous = self.active.get(key)
        self.active[key] = conn
        if previous is not conn:
            # no Health frame to either side: derper never sends one, and tailscaled would show it
            # as a DERP health warning that flaps with every switch
            self._announce_present(conn)
        if self.forwarder is not None:
            self.forwarder.local_active_changed(key, conn.epoch, conn.preferred, True)
        self.reroute(key)

    def reroute(self, key: bytes) -> None:
        """Recompute the hot-path route for key: the local active connection, unless the directory
        says an owner elsewhere wins (a newer or preferred connection of the same key)."""
        conn = self.active.get(key)
        if conn is not None and (self.forwarder is None or not self.forwarder.remote_winner(key)):
            self.clients[key] = conn
        else:
            self.clients.pop(key, None)

    def await_published(self, callback: Callable[[], None]) -> None:
        """Call back once the node's other workers can route to what was just registered."""
        barrier = self.publication_barrier
        if barrier is None:
            callback()
        else:
            barrier(callback)

    def note_activity(self, conn: Client, now: float) -> None:
        """A frame (any frame) from one of several connections of a key: derper's
        lastWriterIsActive makes it the active one, and removal falls back to the latest speaker."""
        conn.last_active = now
        if self.active.get(conn.key) is not conn:
            self._activate(conn.key, conn)

    def note_preferred(self, conn: Client, preferred: bool) -> None:
        if preferred != conn.preferred and conn.registered:
            self.stats.current_home_connections += 1 if preferred else -1
            if preferred:  # derper's setPreferred: home_moves_in / home_moves_out
                self.stats.home_moves_in += 1
            else:
                self.stats.home_moves_out += 1
        conn.preferred = preferred
        if not conn.registered:
            return
        if conn.has_dup and preferred:
            self._activate(conn.key, conn)
        elif self.active.get(conn.key) is conn and self.forwarder is not None:
            self.forwarder.local_active_changed(conn.key, conn.epoch, preferred, True)
            self.reroute(conn.key)

    # -- key presence (local and remote) ------------------------------------------------------------

    def _announce_present(self, conn: Client) -> None:
        if self.watchers:
            frame = conn.peer_present_frame()
            for watcher in tuple(self.watchers):
                if watcher is not conn:
                    watcher.send_frame(frame)

    def remote_key_present(self, key: bytes) -> None:
        """A key appeared on another worker or node: tell watchers (WatchConns sees the whole node)."""
        if self.watchers and key not in self.active:
            frame = F.build_peer_present(key, None, 0, F.PEER_PRESENT_IS_REGULAR)
            for watcher in tuple(self.watchers):
                watcher.send_frame(frame)

    def key_gone(self, key: bytes, *, tell_watchers: bool = True) -> None:
        """The key is no longer reachable anywhere we know of: PeerGone to those who heard from it."""
        receivers = self.sent_to.pop(key, None)
        if receivers:
            frame = F.build_peer_gone(key, F.PEER_GONE_DISCONNECTED)
            for receiver_key in receivers:
                receiver = self.active.get(receiver_key)
                if receiver is not None:
                    receiver.send_frame(frame)
                    self.stats.peer_gone_disconnected_frames += 1
        if tell_watchers and self.watchers:
            frame = F.build_peer_gone(key, F.PEER_GONE_DISCONNECTED)
            for watcher in tuple(self.watchers):
                watcher.send_frame(frame)

    def remote_key_gone(self, key: bytes) -> None:
        if key not in self.active:
            self.key_gone(key)

    def add_watcher(self, conn: Client) -> None:
        self.watchers.add(conn)
        for client in list(self.active.values()):
            if client is not conn:
                conn.send_frame(client.peer_present_frame())
        if self.forwarder is not None:
            for key in self.forwarder.remote_keys():
                if key not in self.active:
                    conn.send_frame(F.build_peer_present(key, None, 0, F.PEER_PRESENT_IS_REGULAR))

    def close_peer(self, key: bytes) -> int:
        conns = list(self.dups.get(key, ())) or ([self.active[key]] if key in self.active else [])
        for conn in conns:
            conn.close_with("closed by mesh peer (ClosePeer)")
        return len(conns)

    # -- packets ------------------------------------------------------------------------------------

    def note_delivery(self, *, src: bytes, dst: bytes) -> None:
        """dst received from src: it is told PeerGone when src leaves (derper's sentTo)."""
        receivers = self.sent_to.get(src)
        if receivers is None:
            self.sent_to[src] = {dst}
        elif dst not in receivers:
            receivers.add(dst)

    def deliver(self, *, dst: bytes, src: bytes, packet: Payload) -> bool:
        """Deliver a packet from src to dst if dst is connected here; False when it is not.

        Uses the local active connection, not the route: whoever forwarded it here decided we own
        dst, and bouncing it on would risk loops while directories converge."""
        conn = self.active.get(dst)
        if conn is None:
            return False
        conn.deliver(src=src, packet=packet)
        self.note_delivery(src=src, dst=dst)
        return True

    def deliver_mesh_frames(self, built: MeshFrames) -> int:
        """What `fastpath.mesh_frames` built from one PACKETS message of our mesh: as
        deliver_forwarded_batch, with the frames already joined per connection."""
        batches, count, dropped, pairs, _ = built
        stats = self.stats
        stats.packets_forwarded_in += count
        if dropped:
            stats.drop("unknown_dest_on_fwd", dropped)
        for src, dst in pairs:
            self.note_delivery(src=src, dst=dst)
        for conn, frames, frame_count in batches:
            conn.deliver_frames(frames, frame_count)
        return count

    def deliver_forwarded_batch(self, records: Iterable[tuple[bytes, bytes, Payload]]) -> int:
        """Packets from our own mesh: one write per destination connection for the whole batch.

        Returns how many records were read (delivered or dropped); raises what the iterator raises."""
        active = self.active
        batches: dict[Client, list[Payload]] = {}
        count = dropped = 0
        last_src = last_dst = b""
        try:
            for dst, src, packet in records:
                count += 1
                conn = active.get(dst)
                if conn is None:
                    dropped += 1
                    continue
                header = _RECV_HEADER(F.RECV_PACKET, 32 + len(packet))
                parts = batches.get(conn)
                if parts is None:
                    batches[conn] = [header + src, packet]
                else:
                    parts += (header + src, packet)
                # a batch holds runs of one sender's window to one receiver: note each pair once a run
                if src != last_src or dst != last_dst:
                    self.note_delivery(src=src, dst=dst)
                    last_src, last_dst = src, dst
        finally:
            self.stats.packets_forwarded_in += count
            if dropped:
                self.stats.drop("unknown_dest_on_fwd", dropped)
            for conn, parts in batches.items():
                conn.deliver_frames(b"".join(parts), len(parts) // 2)
        return count

    def deliver_forwarded(self, *, dst: bytes, src: bytes, packet: Payload, from_derp_mesh: bool = False) -> bool:
        """A packet another worker or node sent us for a key it believes is here.

        A stock derper (Tailscale's mesh) sees our whole node as one server, so what it forwards
        may belong to another of our workers: that takes one more hop over our own mesh. Packets
        from our own mesh are never forwarded again, so nothing can loop."""
        self.stats.packets_forwarded_in += 1
        if self.deliver(dst=dst, src=src, packet=packet):
            return True
        if from_derp_mesh and self.forwarder is not None and self.forwarder.forward(dst=dst, src=src, packet=packet):
            self.stats.packets_forwarded_out += 1
            return True
        self.stats.drop("unknown_dest_on_fwd", kind=packet_kind(packet), size=len(packet))
        return False

    # -- periodic work ------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> None:
        """Once a second: keepalives for 1/60 of clients; drop clients whose transport has held
        unflushed bytes for longer than the write timeout."""
        now = time.monotonic() if now is None else now
        index = self._sweep_index
        slot = self.keepalive_slots[index]
        self._sweep_index = (index + 1) % KEEPALIVE_SLOTS
        if slot:
            fired, slot_set = tuple(slot), slot
            slot_set.clear()
            for conn in fired:
                conn.send_keepalive()
                conn.keepalive_slot = (index + conn.keepalive_period) % KEEPALIVE_SLOTS
                self.keepalive_slots[conn.keepalive_slot].add(conn)
        for conn in tuple(self.paused):
            # paused means the transport holds bytes the kernel has not taken: derper's per-write
            # deadline (0 disables it for clients, as derper's --tcp-write-timeout 0 does)
            self._check_write_deadline(conn, conn.paused_since, now)
        for conn in tuple(self.tls_connections):
            # TLS transports pause only past HIGH_WATER (conn.connection_made): their deadline runs
            # from the first sweep that finds bytes still buffered
            transport = conn.transport
            if transport is None or not transport.get_write_buffer_size():
                conn.unflushed_since = 0.0
            elif not conn.unflushed_since:
                conn.unflushed_since = now
            else:
                self._check_write_deadline(conn, conn.unflushed_since, now)

    def _check_write_deadline(self, conn: Client, since: float, now: float) -> None:
        limit = self.mesh_write_timeout if conn.is_mesh else self.write_timeout
        if limit and since and now - since > limit:
            self.stats.write_timeouts += 1
            conn.abort_with(f"write timeout ({limit:.0f}s without the client reading)")

    def drain(self, reconnect_in_ms: int = 1000, try_for_ms: int = MAX_TRY_FOR_MS) -> int:
        """Planned shutdown: send Restarting to every client, then close them all."""
        self.draining = True
        frame = F.build_restarting(reconnect_in_ms, min(try_for_ms, MAX_TRY_FOR_MS))
        count = 0
        for conn in tuple(self.connections):
            if conn.registered:
                conn.send_frame(frame, force=True)
                count += 1
            conn.close_with("server restarting", quiet=True)
        self.stats.restarting_frames += count
        return count


def _best_of(group: list[Client]) -> Client:
    """Among duplicates: the one that sent a frame last (derper's sendHistory), else the newest."""
    return max(group, key=lambda c: (c.last_active, c.epoch))
