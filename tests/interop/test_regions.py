"""Scenario 3: one cluster of ours spanning three regions: 901 and 902 with one node each, 903 with
two. Nodes homed on different regions talk; so do two nodes homed on different nodes of region
903 (one started while the first node was down, so that it homed on the second)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.interop.harness import Control, NetNS, derpmap, derpmap_text, tsnet_pairs
from tests.interop.relays import OurNode, mesh_flags, mesh_ports, node_entry, regions_config

PLAIN = {"TS_DEBUG_USE_DERP_HTTP": "1"}


def test_regions_and_a_two_node_region(ns: NetNS, bins: Path) -> None:
    layout = [("a", 901), ("b", 902), ("c", 903), ("d", 903)]
    ports = {name: mesh_ports(1) for name, _ in layout}
    nodes: dict[str, OurNode] = {}
    for index, (name, region) in enumerate(layout):
        join = [ports["a"]] if index else []
        nodes[name] = OurNode(ns, f"{name}.derp.test", None, workers=1,
                              extra=mesh_flags(name, region, ports[name], join))
    regions: dict[int, list[dict[str, object]]] = {}
    for name, region in layout:
        node = nodes[name]
        entry = node_entry(f"{region}{name}", node.hostname, node.port, node.stun_port)
        regions.setdefault(region, []).append({**entry, "insecure_for_tests": True})
    config = ["--config", str(regions_config(ns.workdir, regions))]
    derp_map = derpmap(config)
    assert [n["HostName"] for n in derp_map["Regions"]["903"]["Nodes"]] == ["c.derp.test", "d.derp.test"]
    for name in ("a", "b", "d"):
        nodes[name].start()
    try:
        # the control server takes headscale's YAML form, decoded the way headscale decodes it
        control = Control(ns, bins, derpmap_text(config, "--format", "headscale"))

        # homed on different regions
        results = tsnet_pairs(ns, bins, control, pairs=2, size=1 << 20, env=PLAIN,
                              extra=["-home-a", "901", "-home-b", "902"])
        assert all((r["home_a"], r["home_b"]) == ("r901", "r902") for r in results), results

        # region 903: the second nodes home on d while c is down; then c comes back and the first
        # nodes home on c, the region's first node
        go = ns.workdir / "start-a"
        pair = ns.start([bins / "tsnetpair", "-control", control.url, "-pairs", "2", "-bytes", str(1 << 20),
                         "-dir", ns.workdir / "tsnet-903", "-home-a", "903", "-home-b", "903", "-b-first", go],
                        env={**PLAIN, "TS_DEBUG_ALWAYS_USE_DERP": "1"}, name="tsnetpair-903")
        pair.wait_line("^b-up$", timeout=90)
        nodes["c"].start()
        go.touch()
        assert pair.wait(150) == 0, pair.tail()
        results = [json.loads(line) for line in pair.lines if line.startswith("{")]
        assert len(results) == 2 and all(r["ok"] for r in results), results
        c_cluster, d_cluster = nodes["c"].cluster, nodes["d"].cluster
        assert c_cluster is not None and d_cluster is not None
        c_keys, d_keys = c_cluster.worker_of(), d_cluster.worker_of()
        for r in results:
            assert r["key_a"][:8] in c_keys, f"first node of pair {r['pair']} not on c"
            assert r["key_b"][:8] in d_keys and r["key_b"][:8] not in c_keys, f"second node not homed on d: {r}"
    finally:
        for node in nodes.values():
            node.stop()
