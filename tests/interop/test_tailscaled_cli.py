"""Scenario 2: real tailscaled (userspace networking) and its CLI against a 2-worker TLS node of ours.

`tailscale netcheck` must report our region with a latency and a STUN answer, `tailscale ping`
must pong via DERP(our region), `tailscale debug derp` must connect with no error, and
`tailscale nc` must move 20 MB intact."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import trustme

from tests.interop.harness import Control, NetNS, Tailscaled, derpmap
from tests.interop.relays import OurNode
from tests.support import free_port, wait_until

NC_BYTES = 20 << 20
# A one-shot TCP source inside the namespace: sends NC_BYTES of a fixed pattern and closes.
SOURCE = """
import socket, sys
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
conn, _ = listener.accept()
block = bytes(range(256)) * 256
left = int(sys.argv[2])
while left > 0:
    chunk = block[: min(left, len(block))]
    conn.sendall(chunk)
    left -= len(chunk)
conn.close()
"""


def expected_digest(size: int) -> str:
    block = bytes(range(256)) * 256
    digest = hashlib.sha256()
    left = size
    while left > 0:
        chunk = block[: min(left, len(block))]
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def test_tailscaled_and_cli_through_our_node(ns: NetNS, bins: Path, ca: trustme.CA, ca_file: Path) -> None:
    node = OurNode(ns, "derp1.test", ca).start()
    derp_map = derpmap(node.flags())
    region_id = int(next(iter(derp_map["Regions"])))
    region = derp_map["Regions"][str(region_id)]
    control = Control(ns, bins, derp_map)
    env = {"SSL_CERT_FILE": str(ca_file), "TS_DEBUG_ALWAYS_USE_DERP": "1"}
    a = Tailscaled(ns, bins, "alpha", env)
    b = Tailscaled(ns, bins, "bravo", env)
    a.up(control)
    ip_b = b.up(control)
    try:
        # netcheck runs in the CLI process: it STUNs our node itself (UDP is not disabled there)
        report = json.loads(a.cli("netcheck", "--format=json", env={"SSL_CERT_FILE": str(ca_file)},
                                  timeout=90).stdout)
        assert report["UDP"] is True, report
        assert str(region_id) in report["RegionLatency"], report
        assert report["RegionLatency"][str(region_id)] > 0
        assert report["PreferredDERP"] == region_id, report
        assert report.get("GlobalV4"), f"no STUN answer: {report}"

        wait_until(lambda: any(p.get("HostName") == "bravo" for p in a.status().get("Peer", {}).values()),
                   timeout=30, what="alpha to see bravo")
        ping = a.cli("ping", "-c", "3", "--until-direct=false", ip_b, check=False, timeout=60)
        assert re.search(rf"pong from bravo .* via DERP\({region['RegionCode']}\)", ping.stdout), ping.stdout

        derp_report = json.loads(a.cli("debug", "derp", str(region_id), timeout=60).stdout)
        assert any("Successfully established a DERP connection" in line for line in derp_report["Info"]), derp_report
        # The node listens on 127.0.0.1 only and its name has no AAAA: the IPv6 dial is expected to
        # fail (derper reports the same for such a map); nothing else may.
        errors = [line for line in derp_report.get("Errors") or [] if "over IPv6" not in line]
        assert not errors, derp_report

        port = free_port()
        source = ns.start([sys.executable, "-c", SOURCE, str(port), str(NC_BYTES)], name="nc-source")
        source.wait_line("^listening")
        out_path = ns.workdir / "nc.out"
        with out_path.open("wb") as out:
            nc = subprocess.Popen([*ns.prefix(), bins / "tailscale", f"--socket={a.socket}", "nc", ip_b, str(port)],
                                  stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE, env=ns.env(env))
            try:
                nc.wait(120)
                assert nc.returncode == 0, nc.stderr.read().decode() if nc.stderr else ""
            finally:
                if nc.poll() is None:
                    nc.kill()
                assert nc.stdin is not None
                nc.stdin.close()
        source.wait(10)
        data = out_path.read_bytes()
        assert len(data) == NC_BYTES, f"tailscale nc moved {len(data)} of {NC_BYTES} bytes"
        assert hashlib.sha256(data).hexdigest() == expected_digest(NC_BYTES)
    finally:
        node.stop()
