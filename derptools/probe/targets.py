"""Targets from DERP URLs or a derpMap (`cluster derpmap` JSON, a policy file, headscale's YAML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .model import DEFAULT_STUN_PORT, ProbeUsageError, Target, is_ip, join_hostport


def target_from_url(url: str, *, stun_port: int = DEFAULT_STUN_PORT, insecure: bool = False,
                    cert_name: str = "") -> Target:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https"):
        raise ProbeUsageError(f"{url}: want an http:// or https:// DERP URL")
    if not parts.hostname:
        raise ProbeUsageError(f"{url}: no host in the URL")
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError as exc:
        raise ProbeUsageError(f"{url}: {exc}") from None
    host = parts.hostname
    return Target(name=join_hostport(host, port), host_name=host, dial_host=host, derp_port=port, tls=tls,
                  derp_path=parts.path if parts.path not in ("", "/") else "/derp", cert_name=cert_name,
                  insecure=insecure, stun_host=host, stun_port=stun_port)


# tailcfg field names; Go's encoding/json matches keys case-insensitively and headscale's YAML uses the
# lower-cased names, so one folding table reads the policy-file JSON and headscale's file alike.
_MAP_FIELDS = {"regions": "Regions", "omitdefaultregions": "omitDefaultRegions", "homeparams": "HomeParams"}
_REGION_FIELDS = {name.lower(): name for name in (
    "RegionID", "RegionCode", "RegionName", "Latitude", "Longitude", "Avoid", "NoMeasureNoHome", "Nodes")}
_NODE_FIELDS = {name.lower(): name for name in (
    "Name", "RegionID", "HostName", "CertName", "IPv4", "IPv6", "STUNPort", "STUNOnly", "DERPPort",
    "InsecureForTests", "STUNTestIP", "CanPort80")}


def _fold(doc: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names.get(str(key).lower(), key): value for key, value in doc.items()}


def load_derpmap(path: str | Path) -> dict[str, Any]:
    """A derpMap from `cluster derpmap` JSON, a policy file's {"derpMap": ...}, or headscale's YAML."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ProbeUsageError(f"--derpmap {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as json_error:
        try:
            import yaml  # optional: only needed for headscale's YAML files
        except ImportError:
            raise ProbeUsageError(f"--derpmap {path}: not JSON ({json_error}); YAML needs PyYAML") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ProbeUsageError(f"--derpmap {path}: neither JSON nor YAML: {exc}") from None
    if isinstance(doc, dict):
        for key in list(doc):
            if str(key).lower() == "derpmap" and isinstance(doc[key], dict):
                doc = doc[key]
                break
    if not isinstance(doc, dict) or not isinstance(_fold(doc, _MAP_FIELDS).get("Regions"), dict):
        raise ProbeUsageError(f"--derpmap {path}: no Regions map (want the output of `cluster derpmap`)")
    return doc


def targets_from_derpmap(doc: dict[str, Any], *, plain_http: bool = False,
                         insecure: bool = False) -> list[Target]:
    """Targets for every node, in region order. Raises ProbeUsageError on a malformed map."""
    regions = _fold(doc, _MAP_FIELDS)["Regions"]
    targets: list[Target] = []
    for key in sorted(regions, key=lambda k: int(k) if str(k).lstrip("-").isdigit() else 0):
        if regions[key] is None:  # headscale's "1: null" removes a region
            continue
        if not isinstance(regions[key], dict):
            raise ProbeUsageError(f"region {key}: want an object")
        region = _fold(regions[key], _REGION_FIELDS)
        for index, raw in enumerate(region.get("Nodes") or []):
            if not isinstance(raw, dict):
                raise ProbeUsageError(f"region {key} node {index}: want an object")
            node = _fold(raw, _NODE_FIELDS)
            host_name = str(node.get("HostName") or "")
            if not host_name:
                raise ProbeUsageError(f"region {key} node {index}: no HostName")
            ipv4, ipv6 = str(node.get("IPv4") or ""), str(node.get("IPv6") or "")
            # Same choice as Tailscale's dialer when the map pins addresses: IPv4, then IPv6, then DNS.
            dial = ipv4 if is_ip(ipv4, 4) else ipv6 if is_ip(ipv6, 6) else host_name
            stun_port = int(node.get("STUNPort") or 0)
            derp_port = int(node.get("DERPPort") or 0) or (80 if plain_http else 443)
            targets.append(Target(
                name=str(node.get("Name") or f"{key}/{index}"), host_name=host_name, dial_host=dial,
                derp_port=derp_port, tls=not plain_http, region_id=int(region.get("RegionID") or int(key)),
                region_code=str(region.get("RegionCode") or ""), cert_name=str(node.get("CertName") or ""),
                insecure=insecure or bool(node.get("InsecureForTests")),
                stun_host=str(node.get("STUNTestIP") or dial),
                stun_port=-1 if stun_port < 0 else (stun_port or DEFAULT_STUN_PORT),
                stun_only=bool(node.get("STUNOnly"))))
    return targets


def mesh_pairs(targets: list[Target]) -> list[tuple[Target, Target]]:
    """Every ordered pair of DERP (not STUN-only) nodes sharing a region."""
    by_region: dict[int | None, list[Target]] = {}
    for target in targets:
        if not target.stun_only and target.region_id is not None:
            by_region.setdefault(target.region_id, []).append(target)
    return [(a, b) for nodes in by_region.values() for a in nodes for b in nodes if a is not b]
