"""A measurement: how soon a client that just got ServerInfo on one node of a region is reachable
from the other node (derpprobe's cross-node mesh probe sends 100 ms after that). Two regions as
in test_derpprobe: two of our nodes, and our node beside a stock derper, measured in both
directions from the moment the region has started (the first trials are the ones a region that
was just (re)started gives). The assertion is only that every key became reachable; the figures
are printed (run with `-s`) and quoted in docs/MESH.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trustme

from tests.interop.harness import NetNS, Proc
from tests.interop.relays import OurNode, StockDerper, mesh_flags, mesh_key_file, mesh_ports

REGION = 900
TRIALS = 100
ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(ROOT)}


def reach_argv(from_url: str, to_url: str, ca_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.interop.reach", "--from", from_url, "--to", to_url,
            "--trials", str(TRIALS), "--ca-file", str(ca_file), *extra]


def summary_of(output: str, what: str) -> dict[str, object]:
    summary: dict[str, object] = json.loads(output.strip().splitlines()[-1])
    print(f"\nreach {what}: {summary}")
    assert summary["reached"] == TRIALS, summary
    return summary


def reach(ns: NetNS, from_url: str, to_url: str, ca_file: Path) -> dict[str, object]:
    proc = ns.run(reach_argv(from_url, to_url, ca_file), env=ENV, timeout=600)
    return summary_of(proc.stdout, f"{from_url} -> {to_url}")


def reach_at_start(ns: NetNS, from_url: str, to_url: str, ca_file: Path, starting: str) -> Proc:
    """Started before the node named by `starting`: its first trial begins the moment that node accepts."""
    return ns.start(reach_argv(from_url, to_url, ca_file, "--at-start", starting), env=ENV, name="reach")


def finished(proc: Proc, what: str) -> dict[str, object]:
    assert proc.wait(600) == 0, proc.tail()
    return summary_of("\n".join(proc.lines), f"{what} (first trial as the node starts)")


def test_cross_node_reachability_two_of_our_nodes(ns: NetNS, ca: trustme.CA, ca_file: Path) -> None:
    key = mesh_key_file(ns.workdir)
    port_a, port_b = mesh_ports(2), mesh_ports(2)
    a = OurNode(ns, "derp1.test", ca, extra=["--mesh-key-file", str(key), *mesh_flags("a", REGION, port_a, [])])
    b = OurNode(ns, "derp2.test", ca, extra=["--mesh-key-file", str(key), *mesh_flags("b", REGION, port_b, [port_a])])
    a.start()
    starting = [reach_at_start(ns, b.url, a.url, ca_file, "from"), reach_at_start(ns, a.url, b.url, ca_file, "to")]
    b.start()
    try:
        finished(starting[0], "new node b -> a")
        finished(starting[1], "a -> new node b")
        for from_url, to_url in ((b.url, a.url), (a.url, b.url)):
            reach(ns, from_url, to_url, ca_file)
    finally:
        b.stop()
        a.stop()


def test_cross_node_reachability_our_node_and_stock_derper(ns: NetNS, bins: Path, ca: trustme.CA,
                                                           ca_file: Path) -> None:
    key = mesh_key_file(ns.workdir)
    ours = OurNode(ns, "derp1.test", ca)
    derper = StockDerper(ns, bins, "derp3.test", ca, key, mesh_with=[f"{ours.hostname}:{ours.port}"])
    ours.extra = ["--mesh-key-file", str(key), "--mesh-with", derper.url]
    ours.start({"SSL_CERT_FILE": str(ca_file)})
    starting = [reach_at_start(ns, ours.url, derper.url, ca_file, "to"),
                reach_at_start(ns, derper.url, ours.url, ca_file, "from")]
    derper.start(ca_file)
    try:
        finished(starting[0], "ours -> new derper")
        finished(starting[1], "new derper -> ours")
        for from_url, to_url in ((ours.url, derper.url), (derper.url, ours.url)):
            reach(ns, from_url, to_url, ca_file)
    finally:
        ours.stop()
