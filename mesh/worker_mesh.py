"""The mesh as one worker sees it: membership, the key directory and its gossip, and the
`Forwarder` the relay uses for keys held elsewhere.

Every worker of every node is a member. A worker's inbox listens on `ipc://RUN_DIR/mesh-N.ipc`
(its own node's workers use that) and, on a multi-node cluster, on `tcp://MESH_HOST:MESH_PORT+N`
(other nodes use that, with CURVE). Members heartbeat to every member they know with their
incarnation, their directory digest and their view of the membership, so a node joining through
any seed learns everyone. Each member's liveness thread (mesh.liveness) also pulses every member,
so a member whose loop is busy is told from a dead one: a member silent for `dead_after` (longer
across nodes than within one) that does not pulse either, or whose loop stays silent for
`busy_grace` more, is declared dead and its keys leave the directory; a member that learns it was
declared dead (a healed partition) takes a new incarnation and republishes its keys, and is
welcomed back. Every tick renews the leases of our own keys and collects what fell behind the
directory's horizon (docs/MESH.md, "Horizon").

The membership decisions are mesh.membership's pure state machine; this module is its I/O shell
(clock, ZeroMQ, directory) and the relay's forwarder.

Packets go straight to the owning worker on whichever node it is: one ZeroMQ hop, no ingress
process in between, batched per peer per loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from relay_worker.fastpath import MeshFrames, Router, mesh_frames_function
from relay_worker.frames import Payload
from relay_worker.keys import PrivateKey
from relay_worker.relay import Forwarder

from . import wire
from .derp_peering import DerpMeshPeer
from .derper_keys import Replica, holder
from .directory import Change, Directory, DirectoryDecodeError, Owner, Record, decode_entries, encode_entries
from .join_gate import JoinGate
from .liveness import PULSE, LoopMonitor, Pulser
from .membership import Connect, Disconnect, DropKeys, Member, Membership, Rejoin, parse_hello
from .publish_gate import PublishGate
from .transport import CurveKeys, MeshTransport

log = logging.getLogger("mesh.worker")

#: records per directory message, so a full repair never blocks the loop for long
CHUNK = 4000
#: a client key makes this worker gossip at most once per this many seconds (mesh.publish_gate)
PUBLISH_INTERVAL = 1.0
#: members a worker will know (each is a ZeroMQ socket and a heartbeat per interval): a heartbeat
#: listing made-up members cannot make a worker open sockets without bound
MAX_MEMBERS = 256
#: a member learned from another's member list and never heard from itself is forgotten after this
#: many node_dead_after periods (a made-up or long-gone one; a real one is learned again when it speaks)
FORGET_AFTER_DEAD_AFTERS = 4
#: how long a new connection's ServerInfo waits for the node's other live workers to acknowledge
#: its key; past it the handshake proceeds (and is counted in publish_ack_timeouts). A live worker
#: answers in one ipc round trip; this bound only matters for one that is dying or stalled.
PUBLISH_ACK_TIMEOUT = 0.5
#: how long a starting worker holds ServerInfo until it has joined its mesh (mesh.join_gate)
JOIN_TIMEOUT = 5.0


class AckCounters(Protocol):
    publish_ack_timeouts: int


class MeshedRelay(Protocol):
    """The relay as the mesh uses it: the other side of `relay_worker.relay.Forwarder`. The mesh
    installs itself as the relay's forwarder and publication barrier, delivers the packets other
    workers forward here, and reports every change of a key's cluster-wide owner."""

    forwarder: Forwarder | None
    router: Router | None
    publication_barrier: Callable[[Callable[[], None]], None] | None

    @property
    def server_key(self) -> PrivateKey: ...

    @property
    def server_public(self) -> bytes: ...

    @property
    def active(self) -> Mapping[bytes, object]: ...

    @property
    def stats(self) -> AckCounters: ...

    def deliver_forwarded_batch(self, records: Iterable[tuple[bytes, bytes, bytes | memoryview]]) -> int: ...

    def deliver_mesh_frames(self, built: MeshFrames) -> int: ...

    def reroute(self, key: bytes) -> None: ...

    def remote_key_present(self, key: bytes) -> None: ...

    def remote_key_gone(self, key: bytes) -> None: ...

    def key_gone(self, key: bytes, *, tell_watchers: bool = True) -> None: ...


@dataclass
class AckWait:
    """Connections waiting for the node's workers to merge one flush of local directory changes."""

    pending: set[Owner]
    callbacks: list[Callable[[], None]]
    timer: asyncio.TimerHandle | None = None


@dataclass
class Published:
    conn_epoch: int
    pub_epoch: int
    preferred: bool


class WorkerMesh:
    """Implements relay_worker.relay.Forwarder on top of a Directory and a MeshTransport."""

    #: this node's DERPNode, sent in heartbeats for `cluster derpmap --running` (set by cluster/)
    derp_node: dict[str, Any] | None = None
    #: the DERPNode each member last published (opaque here; at most MAX_DERP_SEEN members)
    derp_seen: dict[Owner, dict[str, Any]] | None = None
    MAX_DERP_SEEN = 1024

    def __init__(
        self,
        relay: MeshedRelay,
        owner: Owner,
        incarnation: int,
        inbox: list[str],
        *,
        region: int = 0,
        advertise_tcp: str = "",
        heartbeat: float = 0.5,
        dead_after: float = 3.0,
        node_dead_after: float = 10.0,
        curve: CurveKeys | None = None,
        context: Any = None,
        horizon: float = 120.0,
        busy_grace: float = 30.0,
    ) -> None:
        self.relay = relay
        self.owner = owner
        self.membership = Membership(owner, incarnation, heartbeat=heartbeat, dead_after=dead_after,
                                     node_dead_after=node_dead_after, busy_grace=busy_grace,
                                     max_members=MAX_MEMBERS,
                                     forget_after=FORGET_AFTER_DEAD_AFTERS * node_dead_after)
        self.region = region
        #: records older than this are collected and refused (docs/MESH.md, "Horizon")
        self.horizon = horizon
        #: live entries are refreshed when older than this, well inside the horizon
        self.refresh_after = horizon / 4
        self.busy_grace = busy_grace
        self.directory = Directory(owner, incarnation, horizon_ms=int(horizon * 1000))
        self.transport = MeshTransport(inbox, self._on_message, curve=curve, context=context)
        self.loop_monitor = LoopMonitor(heartbeat)
        self.publish_gate = PublishGate(PUBLISH_INTERVAL)
        self.records_out = 0  # directory records gossiped (deltas, refreshes, corrections)
        self.pulser = Pulser(self.transport.context, lambda: (self.owner.node, self.owner.worker, self.incarnation),
                             lambda: self.loop_monitor.silent_for(time.monotonic()), interval=heartbeat,
                             busy_grace=busy_grace, curve=curve)
        self.ipc_endpoint = next((e for e in self.transport.bound if e.startswith("ipc://")), "")
        self.tcp_endpoint = advertise_tcp
        self.heartbeat = heartbeat
        self.reincarnations = 0
        #: keys held by stock derpers we mesh with (Tailscale's mesh protocol), and which derper:
        #: filled only on the worker that holds the node's derper connections (mesh.derper_keys)
        self.foreign: dict[bytes, DerpMeshPeer] = {}
        #: the compiled receiving end of PACKETS messages (relay_worker/fastpath.py), or None
        self.mesh_frames = mesh_frames_function()
        #: on the other workers, the holder's list of those keys
        self.derper_replica = Replica()
        #: the holder's numbered changes of `foreign`, gathered per loop iteration
        self._derper_seq = 0
        self._derper_present: set[bytes] = set()
        self._derper_gone: set[bytes] = set()
        self._derper_flush_scheduled = False
        self._derper_watch_news = False  # a derper connection was watched: tell the node at once
        self.derper_relayed = 0  # packets other workers sent us for derper keys, sent on as ForwardPacket
        self._outgoing: list[Record] = []
        self._flush_scheduled = False
        #: connections whose keys are in _outgoing, waiting for the local workers' acknowledgements
        self._next_waiters: list[Callable[[], None]] = []
        self._acks: dict[int, AckWait] = {}
        self._ack_seq = 0
        self.derp_peers: list[DerpMeshPeer] = []
        self.join_gate: JoinGate[Owner] = JoinGate(time.monotonic(), JOIN_TIMEOUT)
        self.published: dict[bytes, Published] = {}
        self._pub_epoch = 0
        self._task: asyncio.Task[None] | None = None
        self.packets_in = 0
        self.unroutable = 0
        self.bad_messages = 0

    @property
    def endpoint(self) -> str:
        return self.transport.bound[0]

    @property
    def incarnation(self) -> int:
        return self.membership.incarnation

    @property
    def peers(self) -> dict[Owner, Member]:
        return self.membership.members

    # -- lifecycle ----------------------------------------------------------------------------------

    def add_peer(self, owner: Owner, endpoint: str, *, ipc: str = "", tcp: str = "", region: int = 0) -> None:
        """Know a member: heartbeat to it from now on. Same-node members are reached over ipc."""
        self.membership.add(owner, endpoint, time.monotonic(), ipc=ipc, tcp=tcp, region=region)
        self._carry_out()

    def add_seed(self, endpoint: str) -> None:
        """A `--join` address: heartbeat there until the member behind it is known by name."""
        self.membership.add_seed(endpoint)
        self._carry_out()

    def _carry_out(self) -> None:
        """Do what membership decided, in its order (mesh.membership: the effects)."""
        links_changed = False
        for effect in self.membership.take_effects():
            if isinstance(effect, Connect):
                self.transport.connect(effect.link, effect.endpoint)
                links_changed = True
            elif isinstance(effect, Disconnect):
                self.transport.disconnect(effect.link)
                links_changed = True
            elif isinstance(effect, DropKeys):
                self._apply_changes(self.directory.mark_dead(effect.owner, effect.incarnation))
            elif isinstance(effect, Rejoin):
                self._reincarnate(effect.why)
        if links_changed:
            self._sync_pulse_targets()

    def _sync_pulse_targets(self) -> None:
        # at once, not at the next tick: the loop may stall before then, and the pulses are for that
        self.pulser.set_targets(self.membership.pulse_targets())

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport.start(loop)
        self.relay.forwarder = self
        if self.relay.router is not None:
            self.relay.router.attach_mesh(owners=self.directory.resolved, own=self.owner, links=self.transport.peers)
        self.relay.publication_barrier = self.publication_barrier
        self._task = loop.create_task(self._heartbeat_loop())
        self.loop_monitor.beat(time.monotonic())
        self.pulser.start()
        self._sync_derper_holder(time.monotonic())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.pulser.stop()
        for peer in self.derp_peers:
            await peer.close()
        self.transport.close()

    # -- Forwarder (called by the relay) ------------------------------------------------------------

    def forward(self, *, dst: bytes, src: bytes, packet: Payload) -> bool:
        owner = self.directory.resolved.get(dst)
        if owner is None or owner == self.owner:
            derper = self.foreign.get(dst)
            if derper is not None:
                return derper.forward(src=src, dst=dst, packet=packet)
            replica = self.derper_replica
            if dst not in replica.keys or replica.source is None:
                return False
            owner = replica.source  # a derper's key: the node's holder sends it on as ForwardPacket
        if not self.transport.queue_packet(owner, wire.packet_head(dst, src, len(packet)), packet):
            self.unroutable += 1
            return False
        return True

    def forward_records(self, *, link: Any, records: bytes, count: int) -> None:
        self.transport.queue_records(link, records, count)

    def remote_winner(self, key: bytes) -> bool:
        owner = self.directory.resolved.get(key)
        return owner is not None and owner != self.owner

    def remote_keys(self) -> Iterable[bytes]:
        me = self.owner
        # Only keys of our own cluster: like derper, WatchConns reports what this server can
        # deliver itself, never what it learned from other derpers (that would echo back to them).
        return [key for key, owner in self.directory.resolved.items() if owner != me]

    # -- stock derpers (Tailscale's mesh protocol) ----------------------------------------------

    def mesh_with_derper(self, url: str, mesh_key: str) -> None:
        peer = DerpMeshPeer(url, mesh_key, self.relay.server_key, on_present=self._derper_key_present,
                            on_gone=self._derper_key_gone, on_watching=self._derper_watching)
        self.derp_peers.append(peer)

    @property
    def derper_holder(self) -> bool:
        """This worker holds the node's connections to the stock derpers (mesh.derper_keys)."""
        return any(peer.running for peer in self.derp_peers)

    def _sync_derper_holder(self, now: float) -> None:
        """Hold the derper connections if we are the node's holder, give them up if not, and follow
        the holder's key list otherwise."""
        if not self.derp_peers:
            return
        chosen = holder(self.owner, self.peers, now, self.membership.dead_after)
        if chosen == self.owner:
            if not self.derper_holder:
                log.info("mesh: holding this node's connections to %d stock derper(s)", len(self.derp_peers))
                self._forget_replica(None)
                for peer in self.derp_peers:
                    peer.start()
            return
        if self.derper_holder:
            log.info("mesh: %s/%d holds the derper connections now; giving ours up", chosen.node, chosen.worker)
            for peer in self.derp_peers:
                peer.stop()
        if self.derper_replica.source != chosen:
            self._forget_replica(chosen)

    def _forget_replica(self, source: Owner | None, incarnation: int = 0) -> None:
        for key in self.derper_replica.reset(source, incarnation):
            self._derper_key_left(key)

    def _derper_key_left(self, key: bytes) -> None:
        """No derper we know of holds key any more: PeerGone to our clients that heard from it,
        unless it is reachable in our own cluster."""
        if key not in self.directory.resolved and key not in self.relay.active:
            self.relay.key_gone(key, tell_watchers=False)

    def _derper_key_present(self, key: bytes, peer: DerpMeshPeer) -> None:
        if key == self.relay.server_public:
            return  # our own mesh connection, as the derper lists it
        if key not in self.foreign:
            self._derper_change(key, present=True)
        self.foreign[key] = peer

    def _derper_key_gone(self, key: bytes, peer: DerpMeshPeer) -> None:
        if self.foreign.get(key) is peer:
            del self.foreign[key]
            other = next((p for p in self.derp_peers if p is not peer and key in p.keys), None)
            if other is not None:
                self.foreign[key] = other
            else:
                self._derper_change(key, present=False)
                self._derper_key_left(key)

    def _derper_watching(self, peer: DerpMeshPeer) -> None:
        self._check_joined()
        # tell the node's workers now, not at the next heartbeat: their join gate waits for it
        self._derper_watch_news = True
        self._schedule_derper_flush()

    def _schedule_derper_flush(self) -> None:
        if not self._derper_flush_scheduled:
            self._derper_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_derper_changes)

    def _derper_change(self, key: bytes, *, present: bool) -> None:
        """Queue one change of the holder's derper keys for the node's other workers."""
        if present:
            self._derper_gone.discard(key)
            self._derper_present.add(key)
        else:
            self._derper_present.discard(key)
            self._derper_gone.add(key)
        self._schedule_derper_flush()

    def _local_links(self) -> list[Owner]:
        node = self.owner.node
        return [o for o in self.peers if o.node == node]

    def _flush_derper_changes(self) -> None:
        self._derper_flush_scheduled = False
        present, gone = self._derper_present, self._derper_gone
        self._derper_present, self._derper_gone = set(), set()
        news, self._derper_watch_news = self._derper_watch_news, False
        if not present and not gone and not news:
            return
        self._derper_seq += 1  # numbered when sent: a heartbeat never counts a delta not yet sent
        message = wire.build_control(wire.DERPER_KEYS, self._envelope(
            seq=self._derper_seq, present=sorted(present), gone=sorted(gone), full=False,
            watched=self._derpers_watched()))
        for link in self._local_links():
            self.transport.send_control(link, message)

    def _send_derper_keys(self, peer: Owner) -> None:
        """The whole list, to a worker that missed a delta (or follows a new holder)."""
        if self._derper_flush_scheduled:
            self._flush_derper_changes()
        self.transport.send_control(peer, wire.build_control(wire.DERPER_KEYS, self._envelope(
            seq=self._derper_seq, present=sorted(self.foreign), gone=[], full=True, watched=self._derpers_watched())))

    def _follow_derper_holder(self, sender: Owner, incarnation: int) -> bool:
        """True when sender is the holder we follow; a new incarnation of it starts a new list."""
        replica = self.derper_replica
        if sender != replica.source or self.derper_holder:
            return False
        if incarnation != replica.incarnation:
            self._forget_replica(sender, incarnation)
        return True

    def _on_derper_keys(self, sender: Owner, incarnation: int, body: dict[str, Any]) -> None:
        if not self._follow_derper_holder(sender, incarnation):
            return
        present = [k for k in wire.field(body, "present", list) if isinstance(k, bytes) and len(k) == 32]
        gone = [k for k in wire.field(body, "gone", list) if isinstance(k, bytes) and len(k) == 32]
        watched = body.get("watched")
        applied = self.derper_replica.apply(wire.field(body, "seq", int), present=present, gone=gone,
                                            full=bool(body.get("full")),
                                            watched=watched if isinstance(watched, bool) else None)
        if applied is None:
            self.transport.send_control(sender, wire.build_control(wire.DERPER_SYNC, self._envelope()))
            return
        for key in applied[1]:
            self._derper_key_left(key)
        self._check_joined()

    def _on_holder_heartbeat(self, sender: Owner, incarnation: int, body: dict[str, Any]) -> None:
        said = body.get("derper_keys")
        if not isinstance(said, list) or len(said) != 2 or not self._follow_derper_holder(sender, incarnation):
            return
        seq, watched = said
        if isinstance(seq, int) and self.derper_replica.heartbeat(seq, bool(watched)):
            self.transport.send_control(sender, wire.build_control(wire.DERPER_SYNC, self._envelope()))
        self._check_joined()

    def _derpers_joined(self) -> bool:
        """The join gate's derper condition: watched once (holder), or the holder's list in hand."""
        if not self.derp_peers:
            return True
        if self.derper_holder:
            return self._derpers_watched()
        return self.derper_replica.synced

    def _derpers_watched(self) -> bool:
        return all(p.ever_watched for p in self.derp_peers)

    def _divert_to_derpers(self, records: Iterable[tuple[bytes, bytes, memoryview]]
                           ) -> Iterator[tuple[bytes, bytes, memoryview]]:
        """On the holder: packets the node's other workers sent for derper keys go on to the derper."""
        foreign, active = self.foreign, self.relay.active
        for dst, src, packet in records:
            derper = foreign.get(dst)
            if derper is None or dst in active:
                yield dst, src, packet
            elif derper.forward(src=src, dst=dst, packet=packet):
                self.derper_relayed += 1

    def local_active_changed(self, key: bytes, epoch: int, preferred: bool, present: bool) -> None:
        current = self.published.get(key)
        if present:
            if current is not None and current.conn_epoch == epoch:
                if current.preferred == preferred:
                    return
                current.preferred = preferred
                delta = self.directory.local_set_preferred(key, current.pub_epoch, preferred)
            else:
                # Publication epochs only grow, even when an older duplicate connection becomes
                # active again, so the directory's epoch guard never refuses a real change.
                self._pub_epoch += 1
                self.published[key] = Published(epoch, self._pub_epoch, preferred)
                delta = self.directory.local_add(key, self._pub_epoch, preferred)
        else:
            if current is None or current.conn_epoch != epoch:
                return
            del self.published[key]
            delta = self.directory.local_remove(key, current.pub_epoch)
        if delta:
            if not present:
                self.publish_gate.discard(key)  # a removal goes out at once
                self._queue_records(delta.entries)
            elif self.publish_gate.offer(key, time.monotonic()):
                self._queue_records(delta.entries)
            # else: the key gossiped less than PUBLISH_INTERVAL ago; the tick publishes its entry
            self._apply_changes(delta.changes)

    def _publish_held(self, now: float) -> None:
        keys = self.publish_gate.due(now)
        if keys:
            me = self.owner
            self._queue_records([(key, e) for key in keys for e in self.directory.entries_for(key) if e.owner == me])

    def _queue_records(self, records: list[Record]) -> None:
        """Gather this loop iteration's local directory changes into one message per peer: a burst
        of connects costs one encode and one send, not one per client."""
        if not self.peers and not self.membership.seeds:
            return
        self._outgoing.extend(records)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_records)

    def publication_barrier(self, callback: Callable[[], None]) -> None:
        """Call back once every live worker of this node has merged the local directory changes
        queued so far (so each of them routes to a key registered just now), or after
        PUBLISH_ACK_TIMEOUT. Costs the handshake one ipc round trip and the hot path nothing.
        Until this worker has joined its mesh it waits for that first (mesh.join_gate)."""
        if not self.join_gate.joined:
            self._check_joined()
            if self.join_gate.hold(callback):
                return
        if self._flush_scheduled:
            self._next_waiters.append(callback)
        else:
            callback()  # nothing waiting to go out (no peers, or no change to publish)

    def _check_joined(self) -> None:
        gate = self.join_gate
        if gate.joined:
            return
        node = self.owner.node
        seeds_heard = not self.membership.seeds or any(p.alive for o, p in self.peers.items() if o.node != node)
        waiting = gate.check(time.monotonic(), members=self.peers, seeds_heard=seeds_heard,
                             derpers_watched=self._derpers_joined())
        if not gate.joined:
            return
        if gate.timed_out:
            log.warning("mesh: not joined within %.0fs (members not in sync: %s; seeds heard: %s; derpers "
                        "watched: %d/%d); serving anyway", JOIN_TIMEOUT,
                        ", ".join(f"{o.node}/{o.worker}" for o in gate.pending(set(self.peers))) or "none",
                        seeds_heard, sum(1 for p in self.derp_peers if p.ever_watched), len(self.derp_peers))
        if not waiting:
            return
        # Keys registered while joining may have gone to members not yet connected: send them
        # again, and let their ServerInfo wait for the local acks as any other's does.
        me = self.owner
        self._queue_records([(key, e) for key in self.published for e in self.directory.entries_for(key)
                             if e.owner == me])
        for callback in waiting:
            self.publication_barrier(callback)

    def _flush_records(self) -> None:
        self._flush_scheduled = False
        records, self._outgoing = self._outgoing, []
        waiters, self._next_waiters = self._next_waiters, []
        if records:
            # one record per slot: a later write of this iteration supersedes an earlier one
            records = list({(key, e.owner): (key, e) for key, e in records}.values())
        if not records:
            for callback in waiters:
                callback()
            return
        if not waiters:
            self._broadcast_records(records)
            return
        self._ack_seq += 1
        seq = self._ack_seq
        wait = AckWait(self.membership.local_alive(), waiters)
        self._acks[seq] = wait
        wait.pending -= self._broadcast_records(records, ack=seq, ack_peers=wait.pending)
        if wait.pending:
            wait.timer = asyncio.get_running_loop().call_later(PUBLISH_ACK_TIMEOUT, self._ack_expired, seq)
        else:
            self._ack_done(seq)

    def _ack_done(self, seq: int) -> None:
        wait = self._acks.pop(seq, None)
        if wait is None:
            return
        if wait.timer is not None:
            wait.timer.cancel()
        for callback in wait.callbacks:
            callback()

    def _ack_expired(self, seq: int) -> None:
        wait = self._acks.get(seq)
        if wait is None:
            return
        wait.timer = None
        self.relay.stats.publish_ack_timeouts += len(wait.callbacks)
        log.info("mesh: no acknowledgement from %s within %.1fs; sending ServerInfo to %d client(s) anyway",
                 ", ".join(f"{o.node}/{o.worker}" for o in sorted(wait.pending)), PUBLISH_ACK_TIMEOUT,
                 len(wait.callbacks))
        self._ack_done(seq)

    def _on_ack(self, sender: Owner, seq: int) -> None:
        wait = self._acks.get(seq)
        if wait is None:
            return
        wait.pending.discard(sender)
        if not wait.pending:
            self._ack_done(seq)

    # -- directory changes -> relay -----------------------------------------------------------------

    def _apply_changes(self, changes: list[Change]) -> None:
        relay = self.relay
        me = self.owner
        for change in changes:
            relay.reroute(change.key)
            derper_key = change.key in self.foreign or change.key in self.derper_replica.keys
            if change.new_owner is None and not derper_key:
                relay.remote_key_gone(change.key)
            elif change.old_owner is None and change.new_owner != me and not derper_key:
                relay.remote_key_present(change.key)
        corrections = self.directory.take_corrections()
        if corrections:
            self._broadcast_records(corrections)

    def _broadcast_records(self, records: list[Record], *, ack: int = 0,
                           ack_peers: set[Owner] | frozenset[Owner] = frozenset()) -> set[Owner]:
        """Send records to every member. With ack, the last chunk asks ack_peers to acknowledge
        (ipc is ordered, so its ack covers the earlier chunks); returns the ack_peers it could not
        reach (their queue is full), which then need not be waited for."""
        unreachable: set[Owner] = set()
        last = (len(records) - 1) // CHUNK * CHUNK
        self.records_out += len(records)
        for start in range(0, len(records), CHUNK):
            entries = encode_entries(records[start : start + CHUNK])
            if not ack or start != last:
                message = wire.build_control(wire.DIR_DELTA, self._delta_envelope(entries=entries))
                self.transport.broadcast_control(message)
                continue
            asking = wire.build_control(wire.DIR_DELTA, self._delta_envelope(entries=entries, ack=ack))
            plain = b""
            for peer in list(self.transport.peers):
                if peer in ack_peers:
                    if not self.transport.send_control(peer, asking):
                        unreachable.add(peer)  # type: ignore[arg-type]
                    continue
                plain = plain or wire.build_control(wire.DIR_DELTA, self._delta_envelope(entries=entries))
                self.transport.send_control(peer, plain)
        return unreachable

    def _envelope(self, **body: Any) -> dict[str, Any]:
        return {"node": self.owner.node, "worker": self.owner.worker, "inc": self.incarnation, **body}

    def _delta_envelope(self, **body: Any) -> dict[str, Any]:
        """A DIR_DELTA also says where its sender listens: a member that restarted elsewhere may
        send its first delta (its clients' keys) before its first heartbeat reaches us, and
        forwarding to those keys must not go to its old address."""
        return self._envelope(ipc=self.ipc_endpoint, tcp=self.tcp_endpoint, region=self.region, **body)

    # -- inbox --------------------------------------------------------------------------------------

    def _on_message(self, message: bytes) -> None:
        if not message:
            return
        kind = message[0]
        if kind == wire.PACKETS:
            if self.mesh_frames is not None and not self.foreign:
                built = self.mesh_frames(message, self.relay.active)
                self.packets_in += self.relay.deliver_mesh_frames(built)
                if built[4] is not None:
                    self.bad_messages += 1
                    log.warning("dropping malformed packet batch: %s", built[4])
                return
            try:
                records: Iterable[tuple[bytes, bytes, memoryview]] = wire.iter_packets(message)
                if self.foreign:
                    records = self._divert_to_derpers(records)
                self.packets_in += self.relay.deliver_forwarded_batch(records)
            except wire.WireError as exc:
                self.bad_messages += 1
                log.warning("dropping malformed packet batch: %s", exc)
            return
        if kind == PULSE:
            self._on_pulse(message)
            return
        try:
            body = wire.parse_control(message)
            sender = Owner(wire.field(body, "node", str), wire.field(body, "worker", int))
            incarnation = wire.field(body, "inc", int)
            if kind == wire.HEARTBEAT:
                self._on_heartbeat(sender, incarnation, body)
                self._on_holder_heartbeat(sender, incarnation, body)
                if not self.join_gate.joined:
                    self._note_join_heartbeat(sender, body)
            elif kind == wire.DIR_DELTA:
                endpoints = None
                if "tcp" in body or "ipc" in body:
                    endpoints = (_text(body.get("ipc")), _text(body.get("tcp")))
                self.membership.on_delta(sender, incarnation, time.monotonic(), endpoints=endpoints)
                self._carry_out()
                self._merge(wire.field(body, "entries", bytes))
                ack = body.get("ack")
                if isinstance(ack, int) and not isinstance(ack, bool) and ack > 0:
                    # merged: the sender's new keys are routable here, so it may send ServerInfo
                    self.transport.send_control(sender, wire.build_control(wire.DIR_ACK, self._envelope(ack=ack)))
            elif kind == wire.DIR_ACK:
                self._on_ack(sender, wire.field(body, "ack", int))
            elif kind == wire.DERPER_KEYS:
                self._on_derper_keys(sender, incarnation, body)
            elif kind == wire.DERPER_SYNC:
                if self.derper_holder and sender.node == self.owner.node:
                    self._send_derper_keys(sender)
            elif kind == wire.REPAIR:
                self.membership.heard(sender, incarnation, time.monotonic())
                self._carry_out()
                self._merge(wire.field(body, "entries", bytes))
                if not self.join_gate.joined:
                    self.join_gate.repaired(sender)
                    self._check_joined()
                if body.get("reply"):
                    ids = [i for i in wire.field(body, "ids", list) if isinstance(i, int)]
                    self._send_repair(sender, ids, reply=False)
            else:
                self.bad_messages += 1
        except (wire.WireError, DirectoryDecodeError, ValueError) as exc:
            self.bad_messages += 1
            log.warning("dropping malformed mesh message: %s", exc)

    def _note_join_heartbeat(self, sender: Owner, body: dict[str, Any]) -> None:
        me = [self.owner.node, self.owner.worker]
        lists_us = any(isinstance(row, list) and row[:2] == me for row in body.get("members", ()))
        self.join_gate.heartbeat(sender, lists_us=lists_us, same_digest=body.get("digest") == self.directory.digest())
        self._check_joined()

    def _merge(self, encoded: bytes) -> None:
        self._apply_changes(self.directory.merge(decode_entries(encoded)))

    def _learn_derp_node(self, sender: Owner, derp: Any) -> None:
        if not isinstance(derp, dict) or sender == self.owner:
            return
        if self.derp_seen is None:
            self.derp_seen = {}
        if sender in self.derp_seen or len(self.derp_seen) < self.MAX_DERP_SEEN:
            self.derp_seen[sender] = derp

    def _reincarnate(self, why: str) -> None:
        """We were declared dead (a partition healed): come back as a new incarnation."""
        new = max(self.incarnation + 1, int(time.time() * 1000) * 100)
        log.warning("mesh: %s; rejoining as incarnation %d", why, new)
        delta = self.directory.reincarnate(new)
        self.membership.incarnation = new
        self.reincarnations += 1
        if delta:
            self._broadcast_records(delta.entries)
            self._apply_changes(delta.changes)

    def _on_pulse(self, message: bytes) -> None:
        """A liveness-thread pulse: the member's process runs, whatever its loop is doing. Counts
        only for the incarnation we know (joins and restarts are the heartbeats' business)."""
        try:
            body = wire.parse_control(message)
            sender = Owner(wire.field(body, "node", str), wire.field(body, "worker", int))
            incarnation = wire.field(body, "inc", int)
            silent_ms = wire.field(body, "silent_ms", int)
        except (wire.WireError, ValueError) as exc:
            self.bad_messages += 1
            log.warning("dropping malformed pulse: %s", exc)
            return
        self.membership.on_pulse(sender, incarnation, silent_ms, time.monotonic())

    def _on_heartbeat(self, sender: Owner, incarnation: int, body: dict[str, Any]) -> None:
        self._learn_derp_node(sender, body.get("derp"))
        now = time.monotonic()
        member = self.membership.on_heartbeat(parse_hello(sender, incarnation, body), now)
        self._carry_out()
        digest = wire.field(body, "digest", bytes)
        if member is not None and digest != self.directory.digest() and self.membership.repair_due(member, now):
            self._send_repair(sender, self.directory.diff_buckets(digest), reply=True)

    def _send_repair(self, peer: Owner, ids: list[int], *, reply: bool) -> None:
        records = self.directory.entries_in_buckets(ids)
        chunks = [records[i : i + CHUNK] for i in range(0, len(records), CHUNK)] or [[]]
        for index, chunk in enumerate(chunks):
            self.transport.send_control(peer, wire.build_control(wire.REPAIR, self._envelope(
                ids=ids, entries=encode_entries(chunk), reply=reply and index == len(chunks) - 1)))

    # -- heartbeats and failure detection -----------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("mesh heartbeat failed")
            await asyncio.sleep(self.heartbeat)

    def heartbeat_message(self) -> bytes:
        members = self.membership.member_rows(self.ipc_endpoint, self.tcp_endpoint, self.region)
        dead = self.membership.dead_rows()
        extra: dict[str, Any] = {"derp": self.derp_node} if self.derp_node else {}
        if self.derper_holder:
            extra["derper_keys"] = [self._derper_seq, self._derpers_watched()]
        return wire.build_control(wire.HEARTBEAT, self._envelope(
            digest=self.directory.digest(), ipc=self.ipc_endpoint, tcp=self.tcp_endpoint, region=self.region,
            members=members, dead=dead, **extra))

    def tick(self) -> None:
        now = time.monotonic()
        lag = self.loop_monitor.beat(now)
        if lag > 1.0:
            log.warning("mesh: this worker's loop ran %.1fs late", lag)
        self.membership.tick(now, self.directory)
        self._carry_out()
        self._sync_derper_holder(now)
        self._check_joined()
        self._sync_pulse_targets()
        self._renew_and_collect()
        self._publish_held(now)
        message = self.heartbeat_message()
        for link in self.membership.heartbeat_links():
            self.transport.send_control(link, message)

    def _renew_and_collect(self) -> None:
        """Once per tick: renew our live entries' leases, collect what fell behind the horizon."""
        directory = self.directory
        now_ms = directory.clock.physical_ms()
        delta = directory.refresh(now_ms, int(self.refresh_after * 1000), limit=CHUNK)
        if delta:
            self._broadcast_records(delta.entries)
        changes = directory.collect(now_ms)
        if changes:
            self._apply_changes(changes)

    def stats(self) -> dict[str, Any]:
        return {
            "directory": {**self.directory.stats(), "size": len(self.directory)},
            "mesh": {
                **self.transport.stats(),
                "packets_in": self.packets_in,
                "unroutable": self.unroutable,
                "deaths": self.membership.deaths,
                "bad_messages": self.bad_messages,
                "members_refused": self.membership.members_refused,
                "members_forgotten": self.membership.members_forgotten,
                "peers_alive": sum(1 for p in self.peers.values() if p.alive),
                "reincarnations": self.reincarnations,
                "loop": self.loop_monitor.stats(),
                "pulses_sent": self.pulser.sent,
                "pulses_withheld": self.pulser.withheld,
                "records_out": self.records_out,
                "gossip_held_writes": self.publish_gate.held_writes,
                "gossip_gate_keys": len(self.publish_gate),
                "gossip_held_keys": self.publish_gate.held,
                "busy_peers": sum(1 for p in self.peers.values() if p.alive and p.busy),
                "derpers": [peer.stats() for peer in self.derp_peers],
                "derper_holder": self.derper_holder,
                "derper_keys": len(self.foreign) if self.derper_holder else len(self.derper_replica.keys),
                "derper_keys_from": (f"{src.node}/{src.worker}" if (src := self.derper_replica.source) else None),
                "derper_relayed": self.derper_relayed,
                "incarnation": self.incarnation,
                "joined": self.join_gate.joined,
                "join_timed_out": self.join_gate.timed_out,
                "derp_node": self.derp_node,
                "derp_nodes": {f"{o.node}/{o.worker}": node for o, node in (self.derp_seen or {}).items()
                               if (peer := self.peers.get(o)) is not None and peer.alive},
                "peers": {f"{o.node}/{o.worker}": {
                    "node": o.node, "worker": o.worker, "region": p.region, "alive": p.alive,
                    "incarnation": p.incarnation, "endpoint": p.endpoint, "busy": p.busy,
                    "last_pulse_ago": round(time.monotonic() - p.last_pulse, 2) if p.last_pulse else None,
                    "last_heard_ago": round(time.monotonic() - p.last_heard, 2) if p.ever_heard else None,
                    "keys": sum(1 for owner in self.directory.resolved.values() if owner == o),
                    "packets_out": link.packets_sent if (link := self.transport.peers.get(o)) else 0,
                } for o, p in self.peers.items()},
            },
        }


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
