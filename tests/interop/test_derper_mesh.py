"""Scenario 5: a stock derper and our node meshed both ways with one mesh key.

Tailscale's own DERP client (derp/derphttp), 8 clients on each side, must deliver every packet in
both directions; after either side restarts it must deliver again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trustme

from tests.interop.harness import NetNS
from tests.interop.relays import OurNode, StockDerper, mesh_key_file


def derp_clients(ns: NetNS, bins: Path, url_a: str, url_b: str, ca_file: Path, *, n: int = 8,
                 packets: int = 100, timeout: int = 45) -> dict[str, Any]:
    proc = ns.run([bins / "derpclients", "-a", url_a, "-b", url_b, "-n", str(n), "-packets", str(packets),
                   "-timeout", f"{timeout}s"], env={"SSL_CERT_FILE": str(ca_file)}, timeout=timeout + 30, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"derpclients printed no summary (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    summary: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["ok"], summary
    return summary


def test_stock_derper_and_our_node_mesh_both_ways(ns: NetNS, bins: Path, ca: trustme.CA, ca_file: Path) -> None:
    key = mesh_key_file(ns.workdir)
    ours = OurNode(ns, "derp1.test", ca)
    derper = StockDerper(ns, bins, "derp2.test", ca, key)
    derper.mesh_with = [f"{ours.hostname}:{ours.port}"]
    ours.extra = ["--mesh-key-file", str(key), "--mesh-with", derper.url]
    env = {"SSL_CERT_FILE": str(ca_file)}
    ours.start(env)
    derper.start(ca_file)
    try:
        first = derp_clients(ns, bins, ours.url, derper.url, ca_file)
        assert first["received"] == 2 * 8 * 100

        derper.stop()
        derper.start(ca_file)
        derp_clients(ns, bins, ours.url, derper.url, ca_file)

        ours.stop()
        ours.start(env)
        derp_clients(ns, bins, derper.url, ours.url, ca_file)
    finally:
        ours.stop()
