"""The derpMap operators paste into their tailnet policy file or headscale's derp file.

Shape follows Tailscale's tailcfg.DERPMap / DERPRegion / DERPNode JSON field names.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from .config import Config, parse_hostport


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def node_snippet(config: Config, name: str | None = None) -> dict[str, Any]:
    """This node as a DERPNode, from its own settings."""
    host, port = config.listen_addr
    stun = config.stun_addr
    hostname = config.hostname or (host if host not in ("0.0.0.0", "::", "") else "127.0.0.1")
    node: dict[str, Any] = {
        "Name": name or f"{config.values['node.region_id']}a",
        "RegionID": config.values["node.region_id"],
        "HostName": hostname,
        "DERPPort": port,
        "STUNPort": stun[1] if stun else -1,
    }
    if _is_ip(hostname):
        node["IPv4" if ipaddress.ip_address(hostname).version == 4 else "IPv6"] = hostname
    if not config.tls:
        node["InsecureForTests"] = True
    return node


def _node_from_table(region_id: int, index: int, table: dict[str, Any], insecure: bool) -> dict[str, Any]:
    hostname = str(table.get("hostname", ""))
    if not hostname:
        raise ValueError(f"regions.{region_id}.nodes[{index}]: every node needs a hostname")
    node: dict[str, Any] = {
        "Name": str(table.get("name", f"{region_id}{chr(ord('a') + index)}")),
        "RegionID": region_id,
        "HostName": hostname,
    }
    for key, field in (("ipv4", "IPv4"), ("ipv6", "IPv6"), ("cert_name", "CertName")):
        if table.get(key):
            node[field] = str(table[key])
    derp_port = int(table.get("derp_port", 443))
    node["DERPPort"] = 0 if derp_port == 443 else derp_port
    node["STUNPort"] = int(table.get("stun_port", 3478))
    if table.get("stun_only"):
        node["STUNOnly"] = True
    if table.get("can_port80"):
        node["CanPort80"] = True
    if insecure or table.get("insecure_for_tests"):
        node["InsecureForTests"] = True
    return node


def build_derpmap(config: Config, *, omit_default_regions: bool = True) -> dict[str, Any]:
    """Regions from the [[regions]] tables of the config, or this node alone when there are none."""
    regions: dict[str, Any] = {}
    insecure = not config.tls
    if config.regions:
        for region in config.regions:
            rid = int(region["region_id"])
            if rid < 900:
                raise ValueError(f"regions.{rid}: custom region IDs start at 900")
            regions[str(rid)] = {
                "RegionID": rid,
                "RegionCode": str(region.get("code", f"r{rid}")),
                "RegionName": str(region.get("name", f"Region {rid}")),
                "Nodes": [_node_from_table(rid, i, node, insecure) for i, node in enumerate(region.get("nodes", []))],
            }
    else:
        rid = config.values["node.region_id"]
        regions[str(rid)] = {
            "RegionID": rid,
            "RegionCode": config.values["node.region_code"],
            "RegionName": config.values["node.region_name"],
            "Nodes": [node_snippet(config)],
        }
    doc: dict[str, Any] = {"Regions": regions}
    if omit_default_regions:
        doc = {"OmitDefaultRegions": True, **doc}
    return doc


def to_headscale(derpmap: dict[str, Any]) -> dict[str, Any]:
    """headscale's derp.paths file: `regions:` keyed by ID with snake_case field names."""
    out: dict[str, Any] = {"regions": {}}
    for rid, region in derpmap["Regions"].items():
        nodes = []
        for node in region["Nodes"]:
            entry: dict[str, Any] = {
                "name": node["Name"],
                "regionid": node["RegionID"],
                "hostname": node["HostName"],
                "stunport": node.get("STUNPort", 3478),
                "stunonly": node.get("STUNOnly", False),
                "derpport": node.get("DERPPort", 0),
            }
            if "IPv4" in node:
                entry["ipv4"] = node["IPv4"]
            if "IPv6" in node:
                entry["ipv6"] = node["IPv6"]
            if node.get("InsecureForTests"):
                entry["insecurefortests"] = True
            if "CertName" in node:
                entry["certname"] = node["CertName"]
            nodes.append(entry)
        out["regions"][int(rid)] = {
            "regionid": region["RegionID"],
            "regioncode": region["RegionCode"],
            "regionname": region["RegionName"],
            "nodes": nodes,
        }
    return out


def headscale_yaml(doc: dict[str, Any]) -> str:
    """A tiny YAML emitter for the fixed headscale shape (keeps PyYAML out of the dependencies)."""
    lines = ["regions:"]
    for rid, region in doc["regions"].items():
        lines.append(f"  {rid}:")
        for key in ("regionid", "regioncode", "regionname"):
            lines.append(f"    {key}: {json.dumps(region[key])}")
        lines.append("    nodes:")
        for node in region["nodes"]:
            first = True
            for key, value in node.items():
                prefix = "      - " if first else "        "
                lines.append(f"{prefix}{key}: {json.dumps(value)}")
                first = False
    return "\n".join(lines) + "\n"


__all__ = ["build_derpmap", "headscale_yaml", "node_snippet", "parse_hostport", "to_headscale"]
