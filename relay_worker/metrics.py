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


# -- derper's own exposition (/debug/varz, /debug/vars) ---------------------------------------------
#
# derper publishes an expvar metrics.Set named "derp"; tsweb/varz turns each key into
# "derp_<key>" with the type taken from a "gauge_"/"counter_" prefix (no prefix: counter), and no
# _total suffix. Only the keys this project has data for are published; see docs/WIRE-NOTES.md.

#: (our WorkerStats field, derper's key in its "derp" metrics.Set)
DERPER_KEYS = (
    ("current_connections", "gauge_current_connections"),
    ("current_home_connections", "gauge_current_home_connections"),
    ("watchers", "gauge_watchers"),
    ("clients_local", "gauge_clients_local"),
    ("current_file_descriptors", "gauge_current_file_descriptors"),
    ("accepts", "accepts"),
    ("bytes_received", "bytes_received"),
    ("bytes_sent", "bytes_sent"),
    ("packets_sent", "packets_sent"),
    ("packets_received", "packets_received"),
    ("unknown_frames", "unknown_frames"),
    ("got_ping", "got_ping"),
    ("sent_pong", "sent_pong"),
    ("peer_gone_disconnected_frames", "peer_gone_disconnected_frames"),
    ("peer_gone_not_here_frames", "peer_gone_not_here_frames"),
    ("packets_forwarded_out", "packets_forwarded_out"),
    ("packets_forwarded_in", "packets_forwarded_in"),
    ("write_timeouts", "sclient_write_timeouts"),
    ("current_notideal_connections", "gauge_current_notideal_connections"),
    ("current_dup_client_keys", "gauge_current_dup_client_keys"),
    ("current_dup_client_conns", "gauge_current_dup_client_conns"),
    ("total_dup_client_conns", "counter_total_dup_client_conns"),
    ("home_moves_in", "home_moves_in"),
    ("home_moves_out", "home_moves_out"),
)
#: derpserver.go genDroppedCounters: pre-created for each of these reasons and each kind
DERPER_DROP_REASONS = ("unknown_dest", "unknown_dest_on_fwd", "gone_disconnected", "queue_head", "queue_tail",
                       "write_error", "dup_client")


def derper_gauges(relay: Any) -> dict[str, int]:
    """derper gauges this worker can state that WorkerStats does not hold (added to its snapshot)."""
    import os

    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = 0
    dups = relay.dups.values()
    return {"watchers": len(relay.watchers), "clients_local": len(relay.active), "current_file_descriptors": fds,
            # derper counts a connection not-ideal when its client said Ideal-Node names another node
            "current_notideal_connections": sum(1 for conn in relay.connections
                                                if conn.registered and not conn.ideal_node and not conn.websocket),
            "current_dup_client_keys": len(relay.dups), "current_dup_client_conns": sum(len(g) for g in dups)}


def _summed(snapshots: list[dict[str, Any]], field: str) -> int:
    return sum(int(s.get(field, 0) or 0) for s in snapshots)


def _drops(snapshots: list[dict[str, Any]], field: str = "drops") -> dict[str, int]:
    reasons: dict[str, int] = dict.fromkeys(DERPER_DROP_REASONS, 0)
    for snap in snapshots:
        for reason, count in snap.get(field, {}).items():
            reasons[reason] = reasons.get(reason, 0) + count
    return reasons


def _by_kind(snapshots: list[dict[str, Any]], total: str, disco: str) -> dict[tuple[str, str], int]:
    """(reason, kind) -> count, derper's dropReasonKindLabels: other = all - disco."""
    all_kinds, discos = _drops(snapshots, total), _drops(snapshots, disco)
    out: dict[tuple[str, str], int] = {}
    for reason in sorted(set(all_kinds) | set(discos)):
        out[(reason, "disco")] = discos.get(reason, 0)
        out[(reason, "other")] = all_kinds.get(reason, 0) - discos.get(reason, 0)
    return out


def _stun_dispositions(stun: dict[str, int]) -> dict[str, int]:
    """Our STUN outcomes in stunserver.go's dispositions: a response is success, any drop not_stun."""
    out = {"success": stun.get("response", 0), "not_stun": 0, "read_error": 0, "write_error": 0}
    for reason, count in stun.items():
        if reason != "response":
            out["not_stun"] += count
    return out


def render_derper_varz(snapshots: list[dict[str, Any]], stun_dispositions: dict[str, int] | None = None,
                       clients_total: int | None = None) -> str:
    """Prometheus text as derper's /debug/varz writes it (tsweb/varz), summed over `snapshots`.

    The drop counters (packets and bytes) carry derper's {reason, kind} labels, pre-created for
    the 7 derper reasons and both kinds, plus our own reasons (rate_limited, mesh_full). Packets
    dropped in a batch forwarded by our own mesh are counted as kind="other" without bytes.
    """
    lines: list[str] = []
    for field, key in sorted(DERPER_KEYS, key=lambda fk: fk[1]):
        typ = "gauge" if key.startswith("gauge_") else "counter"
        name = "derp_" + key.removeprefix("gauge_").removeprefix("counter_")
        lines.append(f"# TYPE {name} {typ}\n{name} {_summed(snapshots, field)}")
    if clients_total is not None:
        # derper: every key it can route to (its own and its mesh peers'); here the cluster directory
        local = _summed(snapshots, "clients_local")
        lines.append(f"# TYPE derp_clients_total gauge\nderp_clients_total {max(clients_total, local)}")
        lines.append(f"# TYPE derp_clients_remote gauge\nderp_clients_remote {max(clients_total - local, 0)}")
    lines.append("# TYPE derp_websocket_accepts counter\n"
                 f"derp_websocket_accepts {_summed(snapshots, 'websocket_accepts')}")
    for name, total, disco, what in (("derp_bytes_dropped", "bytes_dropped", "disco_bytes_dropped", "bytes"),
                                     ("derp_packets_dropped", "drops", "disco_drops", "packets")):
        dropped = [f"# TYPE {name} counter", f"# HELP {name} DERP {what} dropped by reason and by kind"]
        for (reason, kind), value in _by_kind(snapshots, total, disco).items():
            dropped.append(f'{name}{{reason="{reason}",kind="{kind}"}} {value}')
        lines.append("\n".join(dropped))
    started = min((float(s.get("started", 0) or 0) for s in snapshots), default=0.0)
    if started:
        import time

        lines.append(f"# TYPE process_start_unix_time gauge\nprocess_start_unix_time {int(started)}")
        lines.append(f"# TYPE uptime_sec counter\nuptime_sec {int(time.time() - started)}")
    if stun_dispositions is not None:
        stun = ["# TYPE stun_requests counter"]
        for disposition, count in sorted(_stun_dispositions(stun_dispositions).items()):
            stun.append(f'stun_requests{{disposition="{disposition}"}} {count}')
        lines.append("\n".join(stun))
    return "\n".join(lines) + "\n"


def derper_expvar(snapshots: list[dict[str, Any]], stun_dispositions: dict[str, int] | None = None) -> dict[str, Any]:
    """/debug/vars as Go's expvar handler writes it: the "derp" set under its own keys."""
    doc: dict[str, Any] = {
        "derp": {key: _summed(snapshots, field) for field, key in sorted(DERPER_KEYS, key=lambda fk: fk[1])},
        "derp_websocket_accepts": _summed(snapshots, "websocket_accepts"),
        "derp_packets_dropped": {f"{reason},{kind}": count
                                 for (reason, kind), count in _by_kind(snapshots, "drops", "disco_drops").items()},
        "derp_bytes_dropped": {f"{reason},{kind}": count for (reason, kind), count
                               in _by_kind(snapshots, "bytes_dropped", "disco_bytes_dropped").items()},
    }
    if stun_dispositions is not None:
        doc["stun_requests"] = _stun_dispositions(stun_dispositions)
    return doc
