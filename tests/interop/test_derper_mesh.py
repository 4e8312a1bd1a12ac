"""Scenario 5: a stock derper and our node meshed both ways with one mesh key.

Tailscale's own DERP client (derp/derphttp), 8 clients on each side, must deliver every packet in
both directions; after either side restarts it must deliver again."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trustme

from tests.interop.harness import NetNS
from tests.interop.relays import OurNode, StockDerper, mesh_key_file
from tests.support import wait_until


def derp_clients(ns: NetNS, bins: Path, url_a: str, url_b: str, ca_file: Path, *, n: int = 8,
                 packets: int = 100, timeout: int = 45) -> dict[str, Any]:
    proc = ns.run([bins / "derpclients", "-a", url_a, "-b", url_b, "-n", str(n), "-packets", str(packets),
                   "-timeout", f"{timeout}s"], env={"SSL_CERT_FILE": str(ca_file)}, timeout=timeout + 30, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"derpclients printed no summary (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    summary: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["ok"], json.dumps(summary)
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


def derper_varz(ns: NetNS, derper: StockDerper, ca_file: Path) -> dict[str, float]:
    """derper's /debug/varz (it serves /debug/ to loopback) as name -> value, unlabelled series only."""
    text = ns.run(["curl", "-sf", "--cacert", str(ca_file), f"https://{derper.hostname}:{derper.port}/debug/varz"],
                  timeout=30).stdout
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            values[name] = float(value)
    return values


def counters(ns: NetNS, derper: StockDerper, ca_file: Path, ours: OurNode) -> str:
    """Where packets went missing, for a failure message: derper's drop series, our drops."""
    assert ours.cluster is not None
    text = ns.run(["curl", "-sf", "--cacert", str(ca_file), f"https://{derper.hostname}:{derper.port}/debug/varz"],
                  timeout=30).stdout
    theirs = [line for line in text.splitlines() if "dropped{" in line and not line.endswith(" 0")]
    mine = [{"drops": {k: v for k, v in doc["worker"]["drops"].items() if v}, "holder": doc["mesh"]["derper_holder"],
             "relayed": doc["mesh"]["derper_relayed"], "mesh_dropped_full": doc["mesh"]["packets_dropped_full"],
             "derpers": doc["mesh"]["derpers"]} for doc in ours.cluster.all_varz()]
    return f"derper drops {theirs}; ours {mine}"


def holders(node: OurNode) -> list[int]:
    """Our workers that hold a connection to the stock derper."""
    assert node.cluster is not None
    return [i for i, doc in enumerate(node.cluster.all_varz()) if doc["mesh"]["derper_holder"]]


def one_connection_from_us(ns: NetNS, derper: StockDerper, ca_file: Path, ours: OurNode) -> bool:
    """derper holds exactly one connection of our node's key, and every worker of ours knows the
    derper's key list from the worker that holds it."""
    assert ours.cluster is not None
    docs = [doc["mesh"] for doc in ours.cluster.all_varz()]
    if len(holders(ours)) != 1 or not all(doc["joined"] for doc in docs):
        return False
    varz = derper_varz(ns, derper, ca_file)
    # derper's own mesh client to us is outbound: its server's connections are ours only
    return varz.get("derp_current_connections") == 1 and varz.get("derp_current_dup_client_keys") == 0


def test_stock_derper_sees_one_connection_from_a_four_worker_node(ns: NetNS, bins: Path, ca: trustme.CA,
                                                                   ca_file: Path) -> None:
    """C13: one DERP-mesh connection per node to each stock derper, as derper keeps one per peer.

    Before (every worker meshing on its own) derper counted 4 connections of our key and 1 dup
    key. Clients on every worker still reach the derper's clients (through the holder), and the
    derper's reach ours; when the holding worker is killed, packets resume once it is restarted."""
    key = mesh_key_file(ns.workdir)
    ours = OurNode(ns, "derp1.test", ca, workers=4)
    derper = StockDerper(ns, bins, "derp2.test", ca, key)
    derper.mesh_with = [f"{ours.hostname}:{ours.port}"]
    ours.extra = ["--mesh-key-file", str(key), "--mesh-with", derper.url]
    env = {"SSL_CERT_FILE": str(ca_file)}
    ours.start(env)
    derper.start(ca_file)
    try:
        wait_until(lambda: one_connection_from_us(ns, derper, ca_file, ours), timeout=30,
                   what="derper to hold exactly one connection of our node's key")
        try:
            summary = derp_clients(ns, bins, ours.url, derper.url, ca_file)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{counters(ns, derper, ca_file, ours)}") from None
        assert summary["received"] == 2 * 8 * 100
        assert one_connection_from_us(ns, derper, ca_file, ours)

        # kill -9 the holder while clients on the other workers send to a derper client
        assert ours.cluster is not None
        probe = ns.start([sys.executable, "-m", "tests.interop.derper_gap_probe", "--derper", derper.url,
                          "--ours", ours.url, "--senders", "8", "--duration", "12"], env=env, name="gap-probe")
        probe.wait_line(r"^ready$", timeout=45)
        (holder,) = holders(ours)
        killed_at = time.time()
        os.kill(ours.cluster.worker_pids()[holder], signal.SIGKILL)
        result = json.loads(probe.wait_line(r"^\{.*\}$", timeout=60).group(0))
        landed = ours.cluster.worker_of()
        print("C13 senders (worker, survived, arrivals):",
              [(landed.get(s["key"][:8]), s["survived"], len(s["arrivals"])) for s in result["senders"]])
        # the senders on the killed worker lost their connection; the others kept sending
        survivors = [s["arrivals"] for s in result["senders"] if landed.get(s["key"][:8]) != holder]
        assert survivors, "every sender landed on the killed worker"
        for arrivals in survivors:
            assert any(t > killed_at for t in arrivals), "packets to the derper's client never resumed"
        gap = max(max(b - a for a, b in itertools.pairwise(arrivals)) for arrivals in survivors)
        print(f"C13: holder worker {holder} killed; longest gap in delivery to the derper's client "
              f"{gap:.2f}s over {len(survivors)} surviving senders")
        wait_until(lambda: one_connection_from_us(ns, derper, ca_file, ours), timeout=30,
                   what="one connection again after the holder's restart")
        try:
            derp_clients(ns, bins, ours.url, derper.url, ca_file)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{counters(ns, derper, ca_file, ours)}") from None
    finally:
        ours.stop()
