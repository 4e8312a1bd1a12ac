"""The derpMap operators paste into their tailnet policy file or headscale's derp file.

Field names, JSON types and order follow Tailscale's tailcfg.DERPMap / DERPRegion / DERPNode
(tailcfg/derpmap.go). Two details from that file matter here:

* the map's flag is tagged `json:"omitDefaultRegions"` (lower-case o); every other field uses its Go
  name. Go's decoder matches names case-insensitively, so "OmitDefaultRegions" (as Tailscale's KB
  spells it) is accepted too, but the tag is what Tailscale itself emits, so we emit that;
* headscale reads `derp.paths` files with gopkg.in/yaml.v3 straight into tailcfg.DERPMap. yaml.v3
  without yaml tags keys each field by its Go name lower-cased ("regionid", "stunport") and matches
  keys case-sensitively, and region keys must be YAML integers (a quoted "900" does not decode into
  map[int]). `derp.urls` documents are decoded with encoding/json, i.e. the tailcfg JSON shape.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, TypeVar

from relay_worker.handshake import is_hex32

from .config import Config, ConfigError, parse_hostport

_T = TypeVar("_T")

#: keys a [[regions]] table and its nodes may carry; anything else is a typo we refuse rather than ignore
#: (a silently ignored "stunport = -1" would publish STUN on 3478 to every client).
_REGION_KEYS = {"region_id", "code", "name", "nodes", "latitude", "longitude", "no_measure_no_home"}
_NODE_KEYS = {"name", "hostname", "ipv4", "ipv6", "cert_name", "stun_port", "derp_port", "stun_only",
              "can_port80", "insecure_for_tests", "stun_test_ip"}


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
        # Names must be unique across the map: a node of a multi-node cluster uses its cluster name.
        "Name": name or config.values["node.name"] or f"{config.values['node.region_id']}a",
        "RegionID": config.values["node.region_id"],
        "HostName": hostname,
    }
    if _is_ip(hostname):
        node["IPv4" if ipaddress.ip_address(hostname).version == 4 else "IPv6"] = hostname
    node["STUNPort"] = stun[1] if stun else -1
    node["DERPPort"] = port
    if not config.tls:
        # dev mode serves plain HTTP; clients still need TS_DEBUG_USE_DERP_HTTP=1 to dial it (docs/PROBE.md)
        node["InsecureForTests"] = True
    if config.values["server.certmode"] == "selfsigned":
        from .tls import ensure_selfsigned

        node["CertName"] = ensure_selfsigned(config).pin
    elif config.values["server.certmode"] == "manual" and _is_ip(hostname):
        # derper prints this too: an IP hostname's cert (self-signed when derper or we made it) is
        # checked by its pin, since no CA vouches for an IP
        from .tls import cert_pin, resolve_cert_files

        files = resolve_cert_files(config)
        if files is not None:
            node["CertName"] = cert_pin(files.crt)
    return node


def _want(where: str, value: Any, kind: type[_T], what: str) -> _T:
    # bool is an int in Python; TOML keeps them apart, and so must we (stun_port = true is a typo)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: want {what}, got {value!r}")
    return value


def _port(where: str, value: Any, *, allow_off: bool) -> int:
    port = _want(where, value, int, "an integer port")
    low = -1 if allow_off else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{where}: port {port} out of range ({low}..65535{', -1 = off' if allow_off else ''})")
    return int(port)


def _address(where: str, value: Any, version: int) -> str:
    text = _want(where, value, str, f"an IPv{version} address or \"none\"")
    # "none" is Tailscale's convention for "do not use this family (and do not ask DNS)"
    if text != "none":
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not an IPv{version} address (or \"none\")") from None
        if addr.version != version:
            raise ConfigError(f"{where}: {text!r} is not an IPv{version} address (or \"none\")")
    return text


def _node_from_table(region_id: int, index: int, table: Any) -> dict[str, Any]:
    where = f"regions.{region_id}.nodes[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: want a table like {{name = ..., hostname = ...}}")
    unknown = sorted(set(table) - _NODE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_NODE_KEYS))}")
    hostname = table.get("hostname", "")
    if not isinstance(hostname, str) or not hostname:
        raise ConfigError(f"{where}: every node needs a hostname (DNS name or IP)")
    # Go field order, so the output diffs cleanly against `tailscale debug derp-map`
    node: dict[str, Any] = {
        "Name": _want(f"{where}.name", table.get("name", f"{region_id}{chr(ord('a') + index)}"), str, "a string"),
        "RegionID": region_id,
        "HostName": hostname,
    }
    if "cert_name" in table:
        cert_name = _want(f"{where}.cert_name", table["cert_name"], str, "a string")
        if cert_name.startswith("sha256-raw:"):
            digest = cert_name.removeprefix("sha256-raw:")
            if not is_hex32(digest):
                raise ConfigError(f"{where}.cert_name: sha256-raw: needs 64 hex digits of the cert's SHA-256")
        node["CertName"] = cert_name
    if "ipv4" in table:
        node["IPv4"] = _address(f"{where}.ipv4", table["ipv4"], 4)
    if "ipv6" in table:
        node["IPv6"] = _address(f"{where}.ipv6", table["ipv6"], 6)
    node["STUNPort"] = _port(f"{where}.stun_port", table.get("stun_port", 3478), allow_off=True)
    if _want(f"{where}.stun_only", table.get("stun_only", False), bool, "true or false"):
        node["STUNOnly"] = True
    node["DERPPort"] = _port(f"{where}.derp_port", table.get("derp_port", 443), allow_off=False)
    # Only the node's own table may turn verification off: it used to follow the local certmode, which
    # (dev by default) marked every production node of a map-only config InsecureForTests.
    if _want(f"{where}.insecure_for_tests", table.get("insecure_for_tests", False), bool, "true or false"):
        node["InsecureForTests"] = True
    if "stun_test_ip" in table:
        node["STUNTestIP"] = _want(f"{where}.stun_test_ip", table["stun_test_ip"], str, "an IP address")
    if _want(f"{where}.can_port80", table.get("can_port80", False), bool, "true or false"):
        node["CanPort80"] = True
    return node


def _region_from_table(index: int, region: Any) -> dict[str, Any]:
    if not isinstance(region, dict):
        raise ConfigError(f"regions[{index}]: want a [[regions]] table")
    rid = _want(f"regions[{index}].region_id", region.get("region_id"), int, "an integer region_id")
    where = f"regions.{rid}"
    unknown = sorted(set(region) - _REGION_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_REGION_KEYS))}")
    if not 900 <= rid <= 65535:
        raise ConfigError(f"{where}: custom region IDs start at 900 (Tailscale reserves 900-999 for you)")
    nodes = _want(f"{where}.nodes", region.get("nodes", []), list, "a list of node tables")
    if not nodes:
        raise ConfigError(f"{where}: a region needs at least one node")
    out: dict[str, Any] = {
        "RegionID": rid,
        "RegionCode": _want(f"{where}.code", region.get("code", f"r{rid}"), str, "a string"),
        "RegionName": _want(f"{where}.name", region.get("name", f"Region {rid}"), str, "a string"),
    }
    for key, field in (("latitude", "Latitude"), ("longitude", "Longitude")):
        if key in region:
            value = region[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}.{key}: want degrees as a number, got {value!r}")
            out[field] = float(value)
    if _want(f"{where}.no_measure_no_home", region.get("no_measure_no_home", False), bool, "true or false"):
        out["NoMeasureNoHome"] = True
    out["Nodes"] = [_node_from_table(rid, i, node) for i, node in enumerate(nodes)]
    return out


def build_derpmap(config: Config, *, omit_default_regions: bool = True) -> dict[str, Any]:
    """Regions from the [[regions]] tables of the config, or this node alone when there are none.

    Raises ConfigError naming the table and key when a region or node is malformed.
    """
    regions: dict[str, Any] = {}
    if config.regions:
        names: dict[str, int] = {}
        for index, table in enumerate(config.regions):
            region = _region_from_table(index, table)
            key = str(region["RegionID"])
            if key in regions:
                raise ConfigError(f"regions.{key}: region_id {key} appears twice")
            for node in region["Nodes"]:
                # tailcfg: "Name is a unique node name (across all regions)"
                if node["Name"] in names:
                    raise ConfigError(f"regions.{key}: node name {node['Name']!r} is already used in region "
                                     f"{names[node['Name']]}; names are unique across all regions")
                names[node["Name"]] = region["RegionID"]
            regions[key] = region
    else:
        rid = config.values["node.region_id"]
        regions[str(rid)] = {
            "RegionID": rid,
            "RegionCode": config.values["node.region_code"],
            "RegionName": config.values["node.region_name"],
            "Nodes": [node_snippet(config)],
        }
    doc: dict[str, Any] = {}
    if omit_default_regions:
        doc["omitDefaultRegions"] = True
    doc["Regions"] = regions
    return doc


def published_derp_node(config: Config) -> dict[str, Any]:
    """What each worker tells the mesh about its node (heartbeats), so any node can print the map of
    the whole running cluster: the DERPNode (named by the node's cluster name) and its region."""
    node = node_snippet(config, name=config.node_name)
    return {"node": node, "region_code": config.values["node.region_code"],
            "region_name": config.values["node.region_name"]}


def running_derpmap(varz: dict[str, Any], *, omit_default_regions: bool = True) -> dict[str, Any]:
    """The derpMap of a running cluster from one worker's /debug/varz: its own node and every live
    member the mesh knows that published its DERPNode, grouped by region, one entry per node."""
    mesh = varz.get("mesh") or {}
    published = [mesh.get("derp_node"), *(mesh.get("derp_nodes") or {}).values()]  # live members only
    regions: dict[str, Any] = {}
    seen: set[str | None] = set()
    for item in published:
        if not isinstance(item, dict) or not isinstance(item.get("node"), dict):
            continue
        node = dict(item["node"])
        if node.get("Name") in seen:
            continue  # every worker of a node publishes the same entry
        seen.add(node.get("Name"))
        key = str(node.get("RegionID"))
        region = regions.setdefault(key, {"RegionID": node.get("RegionID"), "RegionCode": item.get("region_code"),
                                          "RegionName": item.get("region_name"), "Nodes": []})
        region["Nodes"].append(node)
    for region in regions.values():
        region["Nodes"].sort(key=lambda n: str(n.get("Name")))
    doc: dict[str, Any] = {}
    if omit_default_regions:
        doc["omitDefaultRegions"] = True
    doc["Regions"] = dict(sorted(regions.items(), key=lambda kv: int(kv[0])))
    return doc


def to_headscale(derpmap: dict[str, Any]) -> dict[str, Any]:
    """The document headscale decodes into tailcfg.DERPMap: the same regions, minus omitDefaultRegions.

    headscale ignores that flag when merging maps (drop Tailscale's regions by emptying `derp.urls`),
    so it is left out rather than suggesting it does something. As JSON this is what `derp.urls` takes;
    `headscale_yaml` renders it for `derp.paths`.
    """
    return {"Regions": derpmap["Regions"]}


def _yaml_scalar(value: Any) -> str:
    # JSON scalars are valid YAML flow scalars; quoting every string keeps "none", "1e3", "yes" and
    # IPv6 colons from being read as anything but strings.
    return json.dumps(value)


def headscale_yaml(doc: dict[str, Any]) -> str:
    """headscale's derp.paths YAML: yaml.v3 keys (Go names lower-cased), integer region keys.

    A tiny emitter for this fixed shape keeps PyYAML out of the runtime dependencies.
    """
    lines = [
        "# headscale derp.paths file (tailcfg.DERPMap as yaml.v3 reads it).",
        "# To use only these regions, also empty `derp.urls` in headscale's config.yaml.",
        "regions:",
    ]
    for rid, region in doc["Regions"].items():
        lines.append(f"  {int(rid)}:")
        for key, value in region.items():
            if key == "Nodes":
                continue
            lines.append(f"    {key.lower()}: {_yaml_scalar(value)}")
        lines.append("    nodes:")
        for node in region["Nodes"]:
            for i, (key, value) in enumerate(node.items()):
                prefix = "      - " if i == 0 else "        "
                lines.append(f"{prefix}{key.lower()}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


__all__ = ["build_derpmap", "headscale_yaml", "node_snippet", "parse_hostport", "to_headscale"]
