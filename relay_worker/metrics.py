"""Prometheus text for one worker or a whole node, named as derper names its varz."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_COUNTERS = {
    "accepts": "derp_accepts",
    "packets_sent": "derp_packets_sent",
    "packets_received": "derp_packets_received",
    "bytes_sent": "derp_bytes_sent",
    "bytes_received": "derp_bytes_received",
    "packets_forwarded_out": "derp_packets_forwarded_out",
    "packets_forwarded_in": "derp_packets_forwarded_in",
    "peer_gone_disconnected_frames": "derp_peer_gone_disconnected_frames",
    "peer_gone_not_here_frames": "derp_peer_gone_not_here_frames",
    "got_ping": "derp_got_ping",
    "sent_pong": "derp_sent_pong",
    "handshake_failures": "derp_handshake_failures",
    "handshake_timeouts": "derp_handshake_timeouts",
    "refused_clients": "derp_refused_clients",
    "write_timeouts": "derp_write_timeouts",
    "protocol_errors": "derp_protocol_errors",
    "unknown_frames": "derp_unknown_frames",
    "restarting_frames": "derp_restarting_frames",
    "accept_rate_limited": "derp_accept_rate_limited",
}
_GAUGES = {
    "current_connections": "derp_current_connections",
    "current_home_connections": "derp_current_home_connections",
}


class _SnapshotCollector:
    def __init__(self, snapshots: list[dict[str, Any]], extra: dict[str, float],
                 stun_dispositions: dict[str, int]) -> None:
        self.snapshots = snapshots
        self.extra = extra
        self.stun = stun_dispositions

    def collect(self) -> Iterable[Any]:
        for field, name in _GAUGES.items():
            yield GaugeMetricFamily(name, f"{field} summed over workers",
                                    value=sum(s.get(field, 0) for s in self.snapshots))
        for field, name in _COUNTERS.items():
            yield CounterMetricFamily(name, f"{field} summed over workers",
                                      value=sum(s.get(field, 0) for s in self.snapshots))
        dropped = CounterMetricFamily("derp_packets_dropped", "packets dropped, by reason", labels=["reason"])
        reasons: dict[str, int] = {}
        for snap in self.snapshots:
            for reason, count in snap.get("drops", {}).items():
                reasons[reason] = reasons.get(reason, 0) + count
        for reason, count in sorted(reasons.items()):
            dropped.add_metric([reason], count)
        yield dropped
        if self.stun:
            stun = CounterMetricFamily("stun_requests", "STUN datagrams by disposition", labels=["disposition"])
            for disposition, count in sorted(self.stun.items()):
                stun.add_metric([disposition], count)
            yield stun
        for name, value in self.extra.items():
            yield GaugeMetricFamily(name, name.replace("_", " "), value=value)


def render_worker_metrics(snapshots: list[dict[str, Any]], extra: dict[str, float] | None = None,
                          stun_dispositions: dict[str, int] | None = None) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshots, extra or {}, stun_dispositions or {}))  # type: ignore[arg-type]
    return generate_latest(registry).decode()
