"""Scenario 1: two tsnet nodes, DERP only, through a 2-worker node of ours.

Each pair does a disco ping (it must come back via DERP in our region, no direct endpoint) and a
10 MB TCP transfer whose SHA-256 the receiver echoes. Batches repeat until both placements, the two
ends on one worker and on different workers, have been covered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.interop.conftest import tls_files
from tests.interop.harness import WS_BIN, Control, NamespacedCluster, NetNS, derpmap, tsnet_pairs
from tests.support import free_port

HOSTNAME = "derp1.test"
PAIRS_PER_BATCH = 5
MAX_BATCHES = 3


def start_node(ns: NetNS, *, tls: bool, ca: trustme.CA | None, workers: int = 2) -> tuple[NamespacedCluster, list[str]]:
    port, stun = free_port(), free_port()
    flags = ["--listen", f"127.0.0.1:{port}", "--stun", f"127.0.0.1:{stun}"]
    if tls:
        assert ca is not None
        certdir = tls_files(ca, ns.workdir, HOSTNAME)
        ns.hosts[HOSTNAME] = "127.0.0.1"
        ns.write_hosts()
        flags += ["--certmode", "manual", "--hostname", HOSTNAME, "--certdir", str(certdir)]
    cluster = NamespacedCluster(ns, *flags[4:], "--log-level", "debug", workers=workers, port=port)
    cluster.stun_port = stun
    cluster.start()
    return cluster, flags


def placements(cluster: NamespacedCluster, results: list[dict[str, Any]]) -> set[str]:
    owners = cluster.worker_of()
    kinds = set()
    for result in results:
        worker_a, worker_b = owners.get(result["key_a"][:8]), owners.get(result["key_b"][:8])
        assert worker_a is not None and worker_b is not None, f"pair {result} never registered: {owners}"
        kinds.add("same-worker" if worker_a == worker_b else "cross-worker")
    return kinds


MODES = {
    # mode: (TLS, environment, binaries); plain HTTP takes the map in headscale's JSON form
    "tls": (True, {}, None),
    "plain-http": (False, {"TS_DEBUG_USE_DERP_HTTP": "1"}, None),
    "websocket": (True, {"TS_DEBUG_DERP_WS_CLIENT": "1"}, WS_BIN),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_tsnet_pairs_relay_through_two_workers(mode: str, ns: NetNS, bins: Path, ca: trustme.CA,
                                              ca_file: Path) -> None:
    tls, env, pair_bins = MODES[mode]
    cluster, flags = start_node(ns, tls=tls, ca=ca)
    derp_map = derpmap(flags, fmt="tailscale" if tls else "headscale")
    region = int(next(iter(derp_map["Regions"])))
    control = Control(ns, bins, derp_map)
    env = {**env, "SSL_CERT_FILE": str(ca_file)}
    covered: set[str] = set()
    for _ in range(MAX_BATCHES):
        results = tsnet_pairs(ns, pair_bins or bins, control, pairs=PAIRS_PER_BATCH, env=env)
        for result in results:
            assert result["derp_region"] == region, result
            assert result["endpoint"] == "", f"went direct, not through DERP: {result}"
            assert result["bytes"] >= 10 << 20
        covered |= placements(cluster, results)
        if covered == {"same-worker", "cross-worker"}:
            break
    assert covered == {"same-worker", "cross-worker"}, f"only {covered} in {MAX_BATCHES} batches"
    if mode == "websocket":
        logs = [path.read_bytes() for path in ns.workdir.glob("tsnet-*/*/tsnet.log")]
        assert logs and all(b"connecting websocket to https://" in log for log in logs), "a node did not use WebSocket"
