"""Scenario 6: Tailscale's derpprobe, once, over a region of two of our nodes and over a region that
mixes our node with a stock derper: every TLS, STUN and mesh probe must be good.

derpprobe's mesh probe connects two clients (to one node, or to two nodes of a region), sends a
packet at once and waits at most 100 ms before its cross-node probe: the strictest first-packet
check a real program makes. derpprobe runs as soon as the region has started: a starting worker
holds ServerInfo until it has joined its mesh (mesh/join_gate.py, docs/MESH.md), without which the
cross-node probe failed about one run in ten."""

from __future__ import annotations

import re
from pathlib import Path

import trustme

from tests.interop.harness import NetNS, derpmap, write_json
from tests.interop.relays import (
    OurNode,
    StockDerper,
    mesh_flags,
    mesh_key_file,
    mesh_ports,
    node_entry,
    regions_config,
)

REGION = 900


def derpprobe_once(ns: NetNS, bins: Path, derp_map: dict[str, object], key: Path, ca_file: Path,
                   relays: list[OurNode | StockDerper]) -> list[str]:
    map_file = write_json(ns.workdir / "probe-derpmap.json", derp_map)
    proc = ns.run([bins / "derpprobe", "-once", "-spread=false", "-derp-map", f"file://{map_file}",
                   "-mesh-psk-file", key], env={"SSL_CERT_FILE": str(ca_file)}, timeout=120, check=False)
    results = [line for line in proc.stderr.splitlines() if re.search(r"\b(good|bad): ", line)]
    bad = [line for line in results if "bad: " in line]
    assert proc.returncode == 0 and not bad and results, \
        f"derpprobe exit {proc.returncode}:\n{proc.stderr[-4000:]}\n{mesh_log(relays)}"
    return results


def mesh_log(relays: list[OurNode | StockDerper]) -> str:
    """The relays' mesh log lines: when each learned of the others, against when the probe's clients came."""
    out = []
    for relay in relays:
        lines = relay.cluster.output if isinstance(relay, OurNode) and relay.cluster else \
            relay.proc.lines if isinstance(relay, StockDerper) and relay.proc else []
        mesh_lines = [line for line in lines if re.search(r"mesh|connected from", line)]
        out += [f"--- {relay.hostname}", *mesh_lines[-80:]]
    return "\n".join(out)


def expect_probes(results: list[str], node_names: list[str]) -> None:
    text = "\n".join(results)
    for name in node_names:
        assert re.search(rf"derp/r{REGION}/{name}/tls", text), f"no TLS probe of {name}:\n{text}"
        assert re.search(rf"derp/r{REGION}/{name}/udp", text), f"no STUN probe of {name}:\n{text}"
        for other in node_names:
            assert re.search(rf"derp/r{REGION}/{name}/{other}/mesh", text), f"no mesh probe {name}->{other}:\n{text}"


def test_derpprobe_two_of_our_nodes_in_one_region(ns: NetNS, bins: Path, ca: trustme.CA, ca_file: Path) -> None:
    key = mesh_key_file(ns.workdir)
    port_a, port_b = mesh_ports(2), mesh_ports(2)
    a = OurNode(ns, "derp1.test", ca, extra=["--mesh-key-file", str(key), *mesh_flags("a", REGION, port_a, [])])
    b = OurNode(ns, "derp2.test", ca, extra=["--mesh-key-file", str(key), *mesh_flags("b", REGION, port_b, [port_a])])
    config = regions_config(ns.workdir, {REGION: [node_entry("900a", a.hostname, a.port, a.stun_port),
                                                 node_entry("900b", b.hostname, b.port, b.stun_port)]})
    a.start()
    b.start()
    try:
        results = derpprobe_once(ns, bins, derpmap(["--config", str(config)]), key, ca_file, [a, b])
        expect_probes(results, ["900a", "900b"])
    finally:
        b.stop()
        a.stop()


def test_derpprobe_region_mixing_our_node_and_stock_derper(ns: NetNS, bins: Path, ca: trustme.CA,
                                                          ca_file: Path) -> None:
    key = mesh_key_file(ns.workdir)
    ours = OurNode(ns, "derp1.test", ca)
    derper = StockDerper(ns, bins, "derp3.test", ca, key, mesh_with=[])
    derper.mesh_with = [f"{ours.hostname}:{ours.port}"]
    ours.extra = ["--mesh-key-file", str(key), "--mesh-with", derper.url]
    config = regions_config(ns.workdir, {REGION: [node_entry("900a", ours.hostname, ours.port, ours.stun_port),
                                                 node_entry("900b", derper.hostname, derper.port, derper.stun_port)]})
    ours.start({"SSL_CERT_FILE": str(ca_file)})
    derper.start(ca_file)
    try:
        results = derpprobe_once(ns, bins, derpmap(["--config", str(config)]), key, ca_file, [ours, derper])
        expect_probes(results, ["900a", "900b"])
    finally:
        ours.stop()
