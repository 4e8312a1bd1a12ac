"""Scenario 4: admission against a real tailnet. With --verify-clients our node asks the host's own
tailscaled (logged into the test's control server) about each key; with --verify-client-url it
asks the control server's /verify (derper's JSON protocol). Tailnet nodes relay; a key outside
the tailnet is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.interop.harness import Control, NetNS, Tailscaled, derpmap, tsnet_pairs
from tests.interop.relays import OurNode

PLAIN = {"TS_DEBUG_USE_DERP_HTTP": "1"}


def admitted(ns: NetNS, bins: Path, url: str) -> bool:
    proc = ns.run([bins / "derpclients", "-admission", "-a", url, "-timeout", "20s"], timeout=40)
    verdict: bool = json.loads(proc.stdout.splitlines()[-1])["admitted"]
    return verdict


@pytest.mark.parametrize("mode", ["verify-clients", "verify-client-url"])
def test_tailnet_nodes_relay_and_strangers_are_refused(mode: str, ns: NetNS, bins: Path) -> None:
    node = OurNode(ns, "derp1.test", None)
    derp_map = derpmap(node.flags())
    control = Control(ns, bins, derp_map)
    if mode == "verify-clients":
        host = Tailscaled(ns, bins, "relayhost", {})
        host.up(control)
        node.extra = ["--verify-clients", "--tailscaled-socket", str(host.socket)]
    else:
        node.extra = ["--verify-client-url", control.verify_url, "--no-verify-client-url-fail-open"]
    node.start()
    try:
        assert not admitted(ns, bins, node.url), "a key outside the tailnet was admitted"
        results = tsnet_pairs(ns, bins, control, pairs=2, size=1 << 20, env=PLAIN)
        assert all(r["ok"] for r in results)
        assert not admitted(ns, bins, node.url), "a key outside the tailnet was admitted"
    finally:
        node.stop()
