"""Per-worker counters, named after derper's varz so existing dashboards keep their meaning."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def snapshot(self) -> dict[str, object]:
        doc = {name: getattr(self, name) for name in self.__slots__ if name != "drops"}  # type: ignore[attr-defined]
        doc["drops"] = dict(self.drops)
        doc["packets_dropped"] = sum(self.drops.values())
        doc["uptime"] = time.time() - self.started
        return doc
