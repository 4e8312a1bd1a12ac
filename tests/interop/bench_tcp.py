"""One TCP flow between two real tsnet nodes through one relay: our 1-worker node against a stock
derper from the same module, TLS, alternating rounds in one run (docs/INTEROP.md). Needs root (it
runs in a network namespace) and Go. bench/derp_table.py imports run() for its last row.

    .venv/bin/python -m tests.interop.bench_tcp --rounds 5 --megabytes 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import trustme

from tests.interop.harness import Control, NetNS, build_binaries, tsnet_pairs, workdir
from tests.interop.relays import OurNode, StockDerper, mesh_key_file


def run(*, rounds: int, megabytes: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Each round one transfer of `megabytes` MiB through each relay; Mbit/s per round, medians, ratio."""
    bins = build_binaries()
    ca = trustme.CA()
    with workdir("derp-bench-tcp-") as work, NetNS(work) as ns:
        ca_file = work / "ca.pem"
        ca.cert_pem.write_to_path(ca_file)
        ours = OurNode(ns, "derp1.test", ca, workers=1).start()
        derper = StockDerper(ns, bins, "derp2.test", ca, mesh_key_file(work)).start(ca_file)
        maps = {
            "ours": {"Regions": {"900": {"RegionID": 900, "RegionCode": "ours", "Nodes": [
                {"Name": "900a", "RegionID": 900, "HostName": ours.hostname, "STUNPort": ours.stun_port,
                 "DERPPort": ours.port}]}}},
            "derper": {"Regions": {"900": {"RegionID": 900, "RegionCode": "derper",
                                           "Nodes": [derper.node(900, "900a")]}}},
        }
        figures: dict[str, list[float]] = {name: [] for name in maps}
        try:
            for round_ in range(rounds):
                for name, derp_map in maps.items():
                    control = Control(ns, bins, derp_map)
                    result = tsnet_pairs(ns, bins, control, pairs=1, size=megabytes << 20,
                                         env={"SSL_CERT_FILE": str(ca_file)})[0]
                    control.proc.stop()
                    figures[name].append(result["mbit_s"])
                    log(f"round {round_ + 1} {name}: {result['mbit_s']:.1f} Mbit/s")
        finally:
            ours.stop()
    medians = {name: statistics.median(values) for name, values in figures.items()}
    return {"rounds": rounds, "megabytes": megabytes, "mbit_s": figures, "median_mbit_s": medians,
            "median_mbyte_s": {name: value / 8 for name, value in medians.items()},
            "ratio": medians["ours"] / medians["derper"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=50)
    args = parser.parse_args()
    doc = run(rounds=args.rounds, megabytes=args.megabytes, log=lambda line: print(line, flush=True))
    for name, values in doc["mbit_s"].items():
        print(f"{name}: median {doc['median_mbit_s'][name]:.1f} Mbit/s (min {min(values):.1f}, "
              f"max {max(values):.1f}, {len(values)} rounds of {args.megabytes} MiB)")
    print(f"ours/derper: {doc['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
