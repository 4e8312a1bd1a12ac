"""D6: our /debug/varz carries every metric name and label set stock derper's does, so a derper
dashboard works unchanged. Both run in one namespace; each is scraped on loopback (derper allows
/debug/ from there) and the names are compared, labels included for the labelled drop counters.

The names we do not publish are listed here with the reason, and in docs/WIRE-NOTES.md: Go runtime
internals, histograms of derper's own mesh-update and write-batching machinery, and counters for
structures we do not have. The test fails when derper grows a name this list does not account for."""

from __future__ import annotations

import re
from pathlib import Path

from tests.interop.harness import NetNS
from tests.interop.relays import OurNode
from tests.support import wait_until

#: derper names with no counterpart here, and why (docs/WIRE-NOTES.md, known differences)
NOT_PUBLISHED = {
    # Go runtime and process collectors (go_*, memstats_*, goroutines, process_* from Go's client)
    r"go_.*", r"memstats_.*", r"goroutines", r"process_(cpu|max|network|open|resident|virtual|start_time).*",
    r"node_boot_time_seconds", r"derp_memstats_sys0", r"version",
    # derper internals: its mesh-update loop, batched-write histogram, queue-duration average,
    # multi-forwarder bookkeeping (a key heard from two derpers), packets received by kind
    r"derp_mesh_update_.*", r"derp_buffered_write_frames_.*", r"derp_average_queue_duration_ms",
    r"derp_multiforwarder_.*", r"derp_packet_forwarder_delete_other_value", r"derp_packets_received_kind",
    # bootstrap DNS and STUN address-family counters live in their own modules
    r"bootstrap_dns_.*", r"stun_addrfamily", r"derper_tls_.*",
}


def scrape(ns: NetNS, url: str) -> str:
    return ns.run(["curl", "-sf", url], timeout=30).stdout


def names(text: str) -> set[str]:
    """Metric names, and for the labelled drop counters name{labels} too."""
    out: set[str] = set()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series = line.rpartition(" ")[0]
        name = series.split("{", 1)[0]
        out.add(name)
        if name in ("derp_packets_dropped", "derp_bytes_dropped", "stun_requests"):
            out.add(series)
    return out


def test_our_varz_has_every_derper_name(ns: NetNS, bins: Path) -> None:
    derper = ns.start([bins / "derper", "-dev", "-c", ns.workdir / "derper-dev.json"], name="derper-dev")
    derper.wait_line(r"serving on|listening on", timeout=30)
    ours = OurNode(ns, "derp1.test", None, workers=2).start()
    try:
        wait_until(lambda: "derp_accepts" in scrape(ns, "http://127.0.0.1:3340/debug/varz"), timeout=30,
                   what="derper's varz")
        theirs = names(scrape(ns, "http://127.0.0.1:3340/debug/varz"))
        mine = names(scrape(ns, f"http://127.0.0.1:{ours.port}/debug/varz"))
        missing = sorted(n for n in theirs - mine if not any(re.fullmatch(p, n.split("{")[0]) for p in NOT_PUBLISHED))
        assert not missing, f"derper publishes, we do not: {missing}"
    finally:
        ours.stop()
        derper.stop()
