"""What the prober dials and what it reports: targets, checks, per-node and cross-node results."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

DEFAULT_STUN_PORT = 3478
DEFAULT_TIMEOUT = 5.0
#: certificates closer than this to expiry are reported as a warning (exit status stays 0)
WARN_DAYS = 14
#: timed packets sent after the first delivery; the median is reported
SAMPLES = 3
#: how often an undelivered probe packet is re-sent: the receiver may not be registered yet (derper
#: registers a client just after sending ServerInfo) or, across nodes, not yet known to the mesh
RESEND_INTERVAL = 0.1
LABELS = {"stun": "STUN", "tls": "TLS", "probe": "/derp/probe", "derp": "DERP"}


@dataclass
class Target:
    """One DERP node as the prober dials it."""

    name: str
    host_name: str  # TLS ClientHello name and Host header
    dial_host: str  # IPv4/IPv6 from the map when given, else the host name
    derp_port: int
    tls: bool
    region_id: int | None = None
    region_code: str = ""
    derp_path: str = "/derp"
    cert_name: str = ""  # expected certificate name, or "sha256-raw:<hex>" pin
    insecure: bool = False  # InsecureForTests / --insecure: report, do not verify
    stun_host: str = ""
    stun_port: int = DEFAULT_STUN_PORT  # -1 = no STUN on this node
    stun_only: bool = False

    @property
    def address(self) -> str:
        return join_hostport(self.dial_host, self.derp_port)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}{self.derp_path}"

    @property
    def pin(self) -> str:
        return self.cert_name.removeprefix("sha256-raw:").lower() if self.cert_name.startswith("sha256-raw:") else ""


@dataclass
class Check:
    name: str  # stun | tls | probe | derp
    status: str  # ok | warn | fail | skip
    detail: str = ""
    latency_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass
class NodeReport:
    target: Target
    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return not any(check.failed for check in self.checks.values())

    def summary(self) -> str:
        """e.g. "STUN ok, DERP port refused the upgrade: 426 Upgrade Required" (skipped checks left out)."""
        # One TLS or connect problem fails TLS, /derp/probe and DERP alike: say it once, naming all.
        parts: list[tuple[list[str], str]] = []
        for name in ("stun", "tls", "probe", "derp"):
            check = self.checks.get(name)
            if check is None or check.status == "skip":
                continue
            detail = "ok" if check.status == "ok" else check.detail
            same = next((labels for labels, seen in parts if seen == detail and detail != "ok"), None)
            if same is not None:
                same.append(LABELS[name])
            else:
                parts.append(([LABELS[name]], detail))
        phrases = []
        for labels, detail in parts:
            who = labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"
            # "TLS handshake failed", not "TLS TLS handshake failed"
            phrases.append(detail if len(labels) == 1 and detail.startswith(labels[0] + " ") else f"{who} {detail}")
        return ", ".join(phrases)


@dataclass
class MeshReport:
    region_id: int | None
    src: str
    dst: str
    status: str
    detail: str = ""
    latency_ms: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass
class ProbeOptions:
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    warn_days: int = WARN_DAYS
    samples: int = SAMPLES
    #: derper's mesh key (64 hex), as derpprobe -mesh-psk-file: nodes that verify clients admit the
    #: probe's throwaway keys only when they present it, as they do mesh peers
    mesh_key: str = ""


class ProbeUsageError(Exception):
    """Bad arguments or an unreadable derpMap; the CLI exits 2."""


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(text: str, version: int | None = None) -> bool:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or addr.version == version
