"""Per-worker counters, named after derper's varz so existing dashboards keep their meaning."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .frames import Payload, looks_like_disco

DROP_REASONS = (
    "unknown_dest",
    "unknown_dest_on_fwd",
    "gone_disconnected",
    "queue_head",
    "queue_tail",
    "write_error",
    "dup_client",
    "rate_limited",
    "mesh_full",
)


def packet_kind(packet: Payload) -> str:
    """derper's packet kind for its drop labels: "disco" for a disco message (magic, key, nonce), else "other"."""
    return "disco" if looks_like_disco(packet) else "other"


@dataclass(slots=True)
class WorkerStats:
    started: float = field(default_factory=time.time)
    accepts: int = 0
    websocket_accepts: int = 0  # derper: derp_websocket_accepts
    current_connections: int = 0
    current_home_connections: int = 0
    packets_received: int = 0  # SendPacket/ForwardPacket frames read from clients
    bytes_received: int = 0
    packets_sent: int = 0  # RecvPacket frames handed to a client's transport
    bytes_sent: int = 0
    packets_forwarded_out: int = 0  # handed to another worker or node
    packets_forwarded_in: int = 0
    peer_gone_disconnected_frames: int = 0
    peer_gone_not_here_frames: int = 0
    got_ping: int = 0
    sent_pong: int = 0
    handshake_failures: int = 0
    handshake_timeouts: int = 0
    refused_clients: int = 0
    write_timeouts: int = 0
    protocol_errors: int = 0
    unknown_frames: int = 0
    restarting_frames: int = 0
    accept_rate_limited: int = 0
    #: handshakes whose ServerInfo went out before every local worker acknowledged the key
    publish_ack_timeouts: int = 0
    #: handshakes that waited for the node's acknowledgement, and the total wait (seconds)
    publish_waits: int = 0
    publish_wait_seconds: float = 0.0
    #: derper: home_moves_in/out (NotePreferred turning true/false) and counter_total_dup_client_conns
    home_moves_in: int = 0
    home_moves_out: int = 0
    total_dup_client_conns: int = 0
    #: packets dropped per reason (all kinds), and of those the disco ones (derper's kind="disco")
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    disco_drops: dict[str, int] = field(default_factory=dict)
    #: derper's derp_bytes_dropped: packet bytes dropped per reason, all kinds and disco only
    bytes_dropped: dict[str, int] = field(default_factory=dict)
    disco_bytes_dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1, *, kind: str = "other", size: int = 0) -> None:
        """n packets dropped for reason; kind ("disco" or "other", see `packet_kind`) and their
        total size in bytes as derper labels derp_packets_dropped and derp_bytes_dropped."""
        self.drops[reason] = self.drops.get(reason, 0) + n
        if size:
            self.bytes_dropped[reason] = self.bytes_dropped.get(reason, 0) + size
        if kind == "disco":
            self.disco_drops[reason] = self.disco_drops.get(reason, 0) + n
            if size:
                self.disco_bytes_dropped[reason] = self.disco_bytes_dropped.get(reason, 0) + size

    def snapshot(self) -> dict[str, object]:
        doc = {name: getattr(self, name) for name in self.__slots__ if not name.endswith("drops")  # type: ignore[attr-defined]
               and not name.endswith("dropped")}
        for name in ("drops", "disco_drops", "bytes_dropped", "disco_bytes_dropped"):
            doc[name] = dict(getattr(self, name))
        doc["packets_dropped"] = sum(self.drops.values())
        doc["uptime"] = time.time() - self.started
        return doc
