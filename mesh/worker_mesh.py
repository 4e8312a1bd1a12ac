"""The mesh as one worker sees it: the key directory, its gossip with the other workers (and, via
`NodeGossip`, other nodes), and the `Forwarder` the relay uses for keys held elsewhere.

Within a host every worker has an inbox at `ipc://RUN_DIR/mesh-N.ipc`; every worker heartbeats to
every other with its incarnation and directory digest. A silent worker is declared dead after
`dead_after` seconds and its keys leave the directory; a new incarnation is welcomed back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from relay_worker.relay import Relay

from . import wire
from .directory import Change, Directory, DirectoryDecodeError, Owner, Record, decode_entries, encode_entries
from .transport import CurveKeys, MeshTransport

log = logging.getLogger("mesh.worker")

#: records per directory message, so a full repair never blocks the loop for long
CHUNK = 4000


@dataclass
class PeerState:
    owner: Owner
    endpoint: str
    incarnation: int = 0
    last_heard: float = 0.0
    alive: bool = False
    last_repair: float = 0.0


@dataclass
class Published:
    conn_epoch: int
    pub_epoch: int
    preferred: bool


class WorkerMesh:
    """Implements relay_worker.relay.Forwarder on top of a Directory and a MeshTransport."""

    def __init__(
        self,
        relay: Relay,
        owner: Owner,
        incarnation: int,
        inbox: list[str],
        *,
        heartbeat: float = 0.5,
        dead_after: float = 3.0,
        curve: CurveKeys | None = None,
    ) -> None:
        self.relay = relay
        self.owner = owner
        self.incarnation = incarnation
        self.directory = Directory(owner, incarnation)
        self.transport = MeshTransport(inbox, self._on_message, curve=curve)
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.peers: dict[Owner, PeerState] = {}
        self.published: dict[bytes, Published] = {}
        self._pub_epoch = 0
        self._task: asyncio.Task[None] | None = None
        self.packets_in = 0
        self.unroutable = 0
        self.deaths = 0
        self.bad_messages = 0

    @property
    def endpoint(self) -> str:
        return self.transport.bound[0]

    # -- lifecycle ----------------------------------------------------------------------------------

    def add_peer(self, owner: Owner, endpoint: str) -> None:
        if owner == self.owner:
            return
        self.peers[owner] = PeerState(owner, endpoint, last_heard=time.monotonic())
        self.transport.connect(owner, endpoint)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport.start(loop)
        self.relay.forwarder = self
        self._task = loop.create_task(self._heartbeat_loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.transport.close()

    # -- Forwarder (called by the relay) ------------------------------------------------------------

    def forward(self, dst: bytes, src: bytes, packet: bytes) -> bool:
        owner = self.directory.resolved.get(dst)
        if owner is None or owner == self.owner:
            return False
        if not self.transport.queue_packet(owner, wire.packet_record(dst, src, packet)):
            self.unroutable += 1
            return False
        return True

    def remote_winner(self, key: bytes) -> bool:
        owner = self.directory.resolved.get(key)
        return owner is not None and owner != self.owner

    def remote_keys(self) -> Iterable[bytes]:
        me = self.owner
        return [key for key, owner in self.directory.resolved.items() if owner != me]

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
            self._broadcast_records(delta.entries)
            self._apply_changes(delta.changes)

    # -- directory changes -> relay -----------------------------------------------------------------

    def _apply_changes(self, changes: list[Change]) -> None:
        relay = self.relay
        me = self.owner
        for change in changes:
            relay.reroute(change.key)
            if change.new_owner is None:
                relay.remote_key_gone(change.key)
            elif change.old_owner is None and change.new_owner != me:
                relay.remote_key_present(change.key)
        corrections = self.directory.take_corrections()
        if corrections:
            self._broadcast_records(corrections)

    def _broadcast_records(self, records: list[Record]) -> None:
        for start in range(0, len(records), CHUNK):
            message = wire.build_control(wire.DIR_DELTA, self._envelope(
                entries=encode_entries(records[start : start + CHUNK])))
            self.transport.broadcast_control(message)

    def _envelope(self, **body: Any) -> dict[str, Any]:
        return {"node": self.owner.node, "worker": self.owner.worker, "inc": self.incarnation, **body}

    # -- inbox --------------------------------------------------------------------------------------

    def _on_message(self, message: bytes) -> None:
        if not message:
            return
        kind = message[0]
        if kind == wire.PACKETS:
            relay = self.relay
            try:
                for dst, src, payload in wire.iter_packets(message):
                    self.packets_in += 1
                    relay.deliver_forwarded(dst, src, payload)
            except wire.WireError as exc:
                self.bad_messages += 1
                log.warning("dropping malformed packet batch: %s", exc)
            return
        try:
            body = wire.parse_control(message)
            sender = Owner(wire.field(body, "node", str), wire.field(body, "worker", int))
            incarnation = wire.field(body, "inc", int)
            if kind == wire.HEARTBEAT:
                self._on_heartbeat(sender, incarnation, wire.field(body, "digest", bytes))
            elif kind == wire.DIR_DELTA:
                self._note_alive(sender, incarnation)
                self._merge(wire.field(body, "entries", bytes))
            elif kind == wire.REPAIR:
                self._note_alive(sender, incarnation)
                self._merge(wire.field(body, "entries", bytes))
                if body.get("reply"):
                    ids = [i for i in wire.field(body, "ids", list) if isinstance(i, int)]
                    self._send_repair(sender, ids, reply=False)
            else:
                self.bad_messages += 1
        except (wire.WireError, DirectoryDecodeError, ValueError) as exc:
            self.bad_messages += 1
            log.warning("dropping malformed mesh message: %s", exc)

    def _merge(self, encoded: bytes) -> None:
        self._apply_changes(self.directory.merge(decode_entries(encoded)))

    def _note_alive(self, sender: Owner, incarnation: int) -> PeerState | None:
        peer = self.peers.get(sender)
        if peer is None:
            return None
        if incarnation > peer.incarnation:
            if peer.incarnation:
                # the worker restarted: everything its previous process held is gone
                self._apply_changes(self.directory.mark_dead(sender, peer.incarnation))
            peer.incarnation = incarnation
        peer.last_heard = time.monotonic()
        if not peer.alive:
            peer.alive = True
            log.info("mesh peer %s/%d is up (incarnation %d)", sender.node, sender.worker, incarnation)
        return peer

    def _on_heartbeat(self, sender: Owner, incarnation: int, digest: bytes) -> None:
        peer = self._note_alive(sender, incarnation)
        if peer is None or incarnation < peer.incarnation:
            return
        if digest != self.directory.digest():
            now = time.monotonic()
            if now - peer.last_repair >= self.heartbeat:
                peer.last_repair = now
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

    def tick(self) -> None:
        message = wire.build_control(wire.HEARTBEAT, self._envelope(digest=self.directory.digest()))
        self.transport.broadcast_control(message)
        now = time.monotonic()
        for peer in self.peers.values():
            if peer.alive and now - peer.last_heard > self.dead_after:
                peer.alive = False
                self.deaths += 1
                log.warning("mesh peer %s/%d silent for %.1fs: dropping its keys", peer.owner.node,
                            peer.owner.worker, now - peer.last_heard)
                if peer.incarnation:
                    self._apply_changes(self.directory.mark_dead(peer.owner, peer.incarnation))

    def stats(self) -> dict[str, Any]:
        return {
            "directory": {**self.directory.stats(), "size": len(self.directory)},
            "mesh": {
                **self.transport.stats(),
                "packets_in": self.packets_in,
                "unroutable": self.unroutable,
                "deaths": self.deaths,
                "bad_messages": self.bad_messages,
                "peers_alive": sum(1 for p in self.peers.values() if p.alive),
                "peers": {f"{o.node}/{o.worker}": {"alive": p.alive, "incarnation": p.incarnation,
                                                   "last_heard_ago": round(time.monotonic() - p.last_heard, 2)}
                          for o, p in self.peers.items()},
            },
        }
