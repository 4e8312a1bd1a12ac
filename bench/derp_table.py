"""The whole benchmark table of issue 16: our node against a stock derper under Tailscale's own client.

Every row runs the identical load against `cluster up` and against `derper` from the interop tier's
Go module, in the same run, alternating rounds (bench/derp_compare.py's compare()). Rows:

- `T/1w-pinned/S/P`: one worker on CPU 0 against derper GOMAXPROCS=1 on CPU 0, derpload on CPU 1
  (per core);
- `T/1w-machine/S/P`: one worker against GOMAXPROCS=1, nothing pinned;
- `T/Nw-machine-PLACE/S/P`: N = nproc workers against GOMAXPROCS=N, nothing pinned, each pair's two
  clients on one worker (`same`), on two (`cross`) or wherever the kernel's SO_REUSEPORT hash puts
  them (`random`); pairs spread evenly over the workers when pinned. derper, one process, runs
  once per load shape and its figure stands beside all three placements. Read 1w-machine against
  Nw-machine-random for "adding a worker never lowers packets/s";
- `T/1w-capped/S/P` and `T/Nw-capped-PLACE/S/P`: capacity. The same loads with each server capped
  (cgroup CFS quota, derp_compare.CpuCap) at half of CPU 0 (one worker; derpload on CPU 1) or at one
  CPU for the whole node (N workers against GOMAXPROCS=N, nothing pinned), so that the server and not
  derpload sets the rate: packets/s is then what the server does with that CPU. In the uncapped rows
  derpload (one Go process on the other core) saturates first and the servers idle part of the
  time, so their packets/s is derpload's and their CPU per packet is that of a server reading few
  frames per wake-up. No paced run in these rows (a throttled server's latency is the throttle's);
- for T in plain/tls, S in 100/1200 bytes, P in 20/200 pairs, --window packets in flight per pair;
- `tls/connections`: idle RSS per TLS client at --idle-clients, and TLS handshakes/s (loops of
  connect + close, --handshake-concurrency at once), one worker against GOMAXPROCS=1, server on
  CPU 0 and clients on CPU 1 (derpconns, Tailscale's derphttp client);
- `tcp/tsnet`: one TCP flow between two tsnet nodes through each relay (tests/interop/bench_tcp.py,
  needs root for its network namespace).

Packets/s is what derpload's receivers got in the measured window; CPU per packet is the server
processes' utime+stime over that window (kernel included) over those packets; latency is one-way,
send to receive in the one derpload process, at saturation (closed loop, --window in flight), which
includes the queueing the window builds; and once more per server after the rounds, paced at
--paced-fraction (default half) of that server's own median packets/s for --paced-seconds: the
latency of a relay that is not saturated (issue 16's "p99 < 1 ms at half the sustained rate").

    .venv/bin/python bench/derp_table.py --markdown table.md --json table.json
    .venv/bin/python bench/derp_table.py --only 'plain/1w-pinned/1200B/20p' --rounds 1 --seconds 1

At the defaults (3 rounds of 4 s + 1 s warmup, one paced run of 2 s in the uncapped rows) the whole
table takes about 45 minutes on 2 cores (28 for the uncapped rows, 17 for the capped ones).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derp_compare import Shape, compare, compare_connections

from tests.interop.harness import pinned_version

CONNECTIONS_ROW = "tls/connections"
CAPPED_ONE_WORKER = 0.5  # of one CPU
CAPPED_NODE = 1.0
TCP_ROW = "tcp/tsnet"


@dataclass(frozen=True, slots=True)
class Group:
    """One compare() call: a load shape, and the rows (one per placement) it fills."""

    config: str  # 1w-pinned, 1w-machine, Nw-machine, 1w-capped, Nw-capped
    shape: Shape
    rows: dict[str, str]  # placement -> row name
    #: latency below saturation is measured where the server is not throttled (the uncapped rows)
    paced: bool = True


def groups(args: argparse.Namespace) -> Iterator[Group]:
    cores = os.cpu_count() or 1
    for transport in args.transports:
        for size in args.sizes:
            for pairs in args.pairs:
                load = Shape(transport=transport, pairs=pairs, size=size, window=args.window, seconds=args.seconds,
                             warmup=args.warmup)
                tail = f"{size}B/{pairs}p"
                yield Group("1w-pinned", replace(load, workers=1, server_cpus="0", load_cpus="1"),
                            {"random": f"{transport}/1w-pinned/{tail}"})
                yield Group("1w-machine", replace(load, workers=1), {"random": f"{transport}/1w-machine/{tail}"})
                yield Group(f"{cores}w-machine", replace(load, workers=cores),
                            {p: f"{transport}/{cores}w-machine-{p}/{tail}" for p in ("same", "cross", "random")})
                # capacity: each server capped below what the load generator can drive, so the server sets
                # the rate (derp_compare.CpuCap): half of CPU 0 for one worker, one CPU for N workers
                yield Group("1w-capped", replace(load, workers=1, server_cpus="0", load_cpus="1",
                                                 server_quota=CAPPED_ONE_WORKER),
                            {"random": f"{transport}/1w-capped/{tail}"}, paced=False)
                yield Group(f"{cores}w-capped", replace(load, workers=cores, server_quota=CAPPED_NODE),
                            {p: f"{transport}/{cores}w-capped-{p}/{tail}" for p in ("same", "cross", "random")},
                            paced=False)


def selected(name: str, only: re.Pattern[str] | None) -> bool:
    return only is None or only.search(name) is not None


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def latency(result: dict[str, Any] | None) -> str:
    lat = (result or {}).get("latency_us")
    return "-" if not lat else f"{lat['p50']:,.0f} / {lat['p99']:,.0f}"


def share(median: dict[str, Any]) -> str:
    value = median.get("cross_worker_share")
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"derper: tailscale.com {doc['derper_version']}; machine: {doc['nproc']} cores, {doc['cpu']}; "
             f"{doc['date']}; {doc['rounds']} rounds of {doc['seconds']} s (+{doc['warmup']} s warmup), "
             f"window {doc['window']} per pair; medians over the rounds. Latency: one-way, at saturation "
             "(closed loop), and in one run paced below it. ours cross-worker: the share of packets one worker "
             "handed to another. derper is one process, always unpinned (placement does not apply): in the "
             "Nw rows its one figure per load shape stands beside all three placements.", ""]
    if doc["relay"]:
        paced = f"paced at {doc['paced_fraction']:g} of its rate"
        lines += ["| row | ours pkt/s | derper pkt/s | ratio | ours us/pkt | derper us/pkt | ratio "
                  f"| ours p50/p99 us | derper p50/p99 us | ours p50/p99 us, {paced} | derper p50/p99 us, {paced} "
                  "| ours cross-worker |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in doc["relay"]:
            ours, derper = row["ours"], row["derper"]
            lines.append(f"| {row['row']} | {fmt(ours['packets_per_second'])} | {fmt(derper['packets_per_second'])} "
                         f"| {row['ratio_pps']:.2f}x | {fmt(ours['server_us_per_packet'], 2)} "
                         f"| {fmt(derper['server_us_per_packet'], 2)} | {row['ratio_cpu']:.2f}x "
                         f"| {latency(ours)} | {latency(derper)} | {latency(row['ours_paced'])} "
                         f"| {latency(row['derper_paced'])} | {share(ours)} |")
        lines.append("")
    conns = doc.get("connections")
    if conns:
        idle, hs = conns["idle"], conns["handshake_medians"]
        lines += [f"Connections ({conns['transport']}, one worker vs GOMAXPROCS=1, server CPU 0, clients CPU 1):", "",
                  "| | ours | derper | ratio |", "|---|---:|---:|---:|",
                  f"| idle RSS per client at {conns['clients']:,} clients, KiB | "
                  f"{idle['ours']['rss_per_client_kib']:.1f} | {idle['derper']['rss_per_client_kib']:.1f} "
                  f"| {conns['ratio_idle_rss']:.2f}x |",
                  f"| handshakes/s ({conns['concurrency']} at once) | {hs['ours']['handshakes_per_second']:,.0f} "
                  f"| {hs['derper']['handshakes_per_second']:,.0f} | {conns['ratio_handshakes']:.2f}x |",
                  f"| server CPU per handshake, us | {hs['ours']['server_us_per_handshake']:,.0f} "
                  f"| {hs['derper']['server_us_per_handshake']:,.0f} | {conns['ratio_handshake_cpu']:.2f}x |", ""]
    tcp = doc.get("tcp")
    if tcp:
        mb = tcp["median_mbyte_s"]
        lines += [f"One TCP flow between two tsnet nodes through the relay (TLS, one worker, median of "
                  f"{tcp['rounds']} x {tcp['megabytes']} MiB): ours {mb['ours']:.1f} MB/s, derper {mb['derper']:.1f} "
                  f"MB/s, ratio {tcp['ratio']:.2f}x.", ""]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nproc": os.cpu_count(), "cpu": cpu,
            "kernel": os.uname().release, "commit": commit, "derper_version": pinned_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/derper rounds per row")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each window")
    parser.add_argument("--window", type=int, default=32, help="packets in flight per pair")
    parser.add_argument("--paced-fraction", type=float, default=0.5, help="after the rounds, one paced run per "
                        "server at this fraction of its own median packets/s, for latency below saturation (0: none)")
    parser.add_argument("--paced-seconds", type=float, default=2.0, help="measured seconds of that paced run")
    parser.add_argument("--transports", type=lambda v: v.split(","), default=["plain", "tls"])
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[100, 1200])
    parser.add_argument("--pairs", type=lambda v: [int(x) for x in v.split(",")], default=[20, 200])
    parser.add_argument("--idle-clients", type=int, default=10000, help=f"{CONNECTIONS_ROW}: idle TLS clients")
    parser.add_argument("--handshake-concurrency", type=int, default=32, help=f"{CONNECTIONS_ROW}: at once")
    parser.add_argument("--tcp-megabytes", type=int, default=50, help=f"{TCP_ROW}: MiB per transfer")
    parser.add_argument("--only", type=re.compile, help="run only the rows whose name this regex matches "
                        f"(e.g. 'plain/1w-pinned', '{CONNECTIONS_ROW}', '{TCP_ROW}'); --list shows the names")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument("--json", type=Path, help="write every round and median here")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    all_groups = list(groups(args))
    if args.list:
        for group in all_groups:
            print("\n".join(group.rows.values()))
        print(f"{CONNECTIONS_ROW}\n{TCP_ROW}")
        return 0
    doc: dict[str, Any] = {**machine(), "rounds": args.rounds, "seconds": args.seconds, "warmup": args.warmup,
                           "window": args.window, "paced_fraction": args.paced_fraction, "relay": [], "groups": []}
    started = time.monotonic()
    for group in all_groups:
        placements = [p for p, name in group.rows.items() if selected(name, args.only)]
        if not placements:
            continue
        print(f"== {', '.join(group.rows[p] for p in placements)}", flush=True)
        result = compare(group.shape, rounds=args.rounds, placements=placements,
                         paced_fraction=args.paced_fraction if group.paced else 0.0,
                         paced_seconds=args.paced_seconds, log=lambda line: print("   " + line, flush=True))
        doc["groups"].append(result)
        for placement in placements:
            ours = result["ours"][placement]
            doc["relay"].append({"row": group.rows[placement], "config": group.config, "placement": placement,
                                 "ours": ours["median"], "derper": result["derper"]["median"],
                                 "ours_paced": ours["paced"], "derper_paced": result["derper"]["paced"],
                                 "ratio_pps": ours["ratio_pps"], "ratio_cpu": ours["ratio_cpu"]})
    if selected(CONNECTIONS_ROW, args.only):
        print(f"== {CONNECTIONS_ROW}", flush=True)
        doc["connections"] = compare_connections(
            transport="tls", clients=args.idle_clients, concurrency=args.handshake_concurrency, seconds=args.seconds,
            warmup=args.warmup, rounds=args.rounds, server_cpus="0", load_cpus="1",
            log=lambda line: print("   " + line, flush=True))
    if selected(TCP_ROW, args.only):
        from tests.interop.bench_tcp import run as tcp_flow

        print(f"== {TCP_ROW}", flush=True)
        doc["tcp"] = tcp_flow(rounds=args.rounds, megabytes=args.tcp_megabytes,
                              log=lambda line: print("   " + line, flush=True))
    doc["elapsed_seconds"] = time.monotonic() - started
    table = markdown(doc)
    print(table)
    print(f"({doc['elapsed_seconds']:.0f} s)")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
