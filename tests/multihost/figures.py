"""The multihost figures for docs/MESH.md ("Multi-host: three regions in namespaces"), as Markdown.

    sudo .venv/bin/python -m tests.multihost.figures [--trials 5] [--rounds 50] [--hold 15]

Runs the same scenarios as tests/multihost (tests/multihost/scenarios.py) with more trials: three
single-node regions a/b/c (2 workers each, --node-dead-after 3) in namespaces of their own, RTT
a-b 30 ms, a-c 80 ms, b-c 150 ms through the delay proxies. Needs root. Takes about 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path

from tests.multihost.netns import NODES, RTT_MS, Topology, one_way_ms
from tests.multihost.scenarios import (
    all_keys,
    close_clients,
    connect_clients,
    exchange,
    failover_kill_c,
    form_mesh_sync,
    key_spread,
    partition_b_c,
    pct,
    summary,
)


def out(line: str = "") -> None:
    print(line, flush=True)


async def regions(trials: int, rounds: int, holds: list[float], modes: list[str]) -> None:
    with Topology() as topo:
        formed = form_mesh_sync(topo)
        out(f"mesh formed: {formed * 1000:.0f} ms after all three nodes served (b and c join through a)")
        out()
        out("### The delay proxy alone: TCP ping-pong (64 bytes) through it, 50 per pair")
        out()
        out("| from | to | RTT set | RTT p50 | RTT p99 | proxy overhead per one-way traversal, p50 |")
        out("|---|---|---:|---:|---:|---:|")
        for x, y in (("a", "b"), ("a", "c"), ("b", "c"), ("b", "a"), ("c", "a"), ("c", "b")):
            rtts = await topo.echo_rtts(x, y)
            rtt = 2 * one_way_ms(x, y)
            out(f"| {x} | {y} | {rtt:.0f} ms | {pct(rtts, 0.5):.1f} ms | {pct(rtts, 0.99):.1f} ms "
                f"| {(pct(rtts, 0.5) - rtt) / 2:.2f} ms |")
        out()
        clients = await connect_clients(topo, 1)
        await all_keys(topo, 3)
        joins: dict[tuple[str, str], list[float]] = defaultdict(list)
        leaves: dict[tuple[str, str], list[float]] = defaultdict(list)
        for _ in range(trials):
            for origin in NODES:
                spread = await key_spread(topo, origin)
                for y, t in spread.join.items():
                    joins[(origin, y)].append(t)
                for y, t in spread.leave.items():
                    leaves[(origin, y)].append(t)
        await close_clients(clients)
        await all_keys(topo, 0)
        out(f"### A new key, known on every worker of a node ({trials} trials; median, min, max)")
        out()
        out("| key connects on | at | link one-way | known on every worker | gone from every worker after it leaves |")
        out("|---|---|---:|---|---|")
        for origin in NODES:
            for y in NODES:
                out(f"| {origin} | {y} | {one_way_ms(origin, y):.0f} ms | {summary(joins[(origin, y)])} "
                    f"| {summary(leaves[(origin, y)])} |")
        out()

        clients = await connect_clients(topo, 3)
        await all_keys(topo, 9)
        result = await exchange(clients, rounds=rounds)
        out(f"### Delivery, 9 clients (3 per node) all to all, {rounds} rounds 20 ms apart, 200-byte packets")
        out()
        out(f"sent {result.sent}, received {result.received}, duplicates {result.duplicates}, "
            f"from the wrong key {result.misattributed}")
        out()
        out("| from | to | packets | link one-way | p50 one-way | p99 one-way | overhead p50 | overhead p99 |")
        out("|---|---|---:|---:|---:|---:|---:|---:|")
        for (x, y), (delay, p50, p99) in result.overhead(RTT_MS).items():
            n = len(result.latency_ms[(x, y)])
            out(f"| {x} | {y} | {n} | {delay:.0f} ms | {delay + p50:.1f} ms | {delay + p99:.1f} ms | {p50:.1f} ms "
                f"| {p99:.1f} ms |")
        out()
        await close_clients(clients)
        await all_keys(topo, 0)

        out("### Partition b-c (a reaches both); drop: every frame silently lost; down: both veth ends down")
        out()
        out("| cut | held | b / c declare the other dead | a's workers saw alive (min) | keys a / b / c during "
            "| delivered during (of 5) | dropped by b, c as unknown_dest | sent into the cut, delivered after heal "
            "| heal: b / c see all 5 peers and 6 keys | a's fewest keys while healing | reincarnations a / b / c |")
        out("|---|---|---|---:|---|---|---:|---:|---|---:|---|")
        for mode, hold in ((m, h) for m in modes for h in holds):
            topo.cut_mode = mode
            clients = await connect_clients(topo, 2)
            await all_keys(topo, 6)
            try:
                part = await partition_b_c(topo, clients, hold=hold)
            finally:
                topo.link("b", "c", up=True)
            after = await exchange(clients, rounds=5)
            cut = f"{part.cut_s:.1f} s"
            delivered = ", ".join(f"{k} {v}" for k, v in part.delivered_during.items())
            out(f"| {mode} | {cut} | {fmt(part.detect, 'b')} / {fmt(part.detect, 'c')} | {part.a_alive_during} "
                f"| {part.keys_during['a']} / {part.keys_during['b']} / {part.keys_during['c']} | {delivered} "
                f"| {part.dropped_unknown} "
                f"| {part.into_the_cut} of 5 | {fmt(part.heal, 'b')} / {fmt(part.heal, 'c')} | {part.a_min_keys_heal} "
                f"| {part.reincarnations['a']} / {part.reincarnations['b']} / {part.reincarnations['c']} |")
            if after.received != after.sent or after.duplicates:
                out(f"(after the heal: sent {after.sent}, received {after.received}, duplicates {after.duplicates})")
            await close_clients(clients)
            await all_keys(topo, 0)
        out()


def fmt(times: dict[str, float], node: str) -> str:
    return f"{times[node] * 1000:.0f} ms" if node in times else "never"


async def failover(trials: int) -> None:
    out("### kill -9 of node c (supervisor and workers), `--node-dead-after 3`")
    out()
    out("| trial | c's keys gone from a / b | c's workers dead at a / b | PeerGone at a's and b's clients "
        "(8 frames) | c's client back on b: known at a / b | reachable from a's client |")
    out("|---|---|---|---|---|---|")
    for trial in range(trials):
        with Topology() as topo:
            form_mesh_sync(topo)
            clients = await connect_clients(topo, 2)
            await all_keys(topo, 6)
            result, returned = await failover_kill_c(topo, clients)
            gone = (f"{summary(result.peer_gone)}" + (f", {result.peer_gone_missing} missing"
                                                      if result.peer_gone_missing else ""))
            out(f"| {trial + 1} | {fmt(result.keys_gone, 'a')} / {fmt(result.keys_gone, 'b')} "
                f"| {fmt(result.members_dead, 'a')} / {fmt(result.members_dead, 'b')} | {gone} "
                f"| {fmt(result.reconnect_known, 'a')} / {fmt(result.reconnect_known, 'b')} "
                f"| {result.reachable * 1000:.0f} ms |")
            await close_clients(clients)
            await returned.close()
    out()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.multihost.figures")
    parser.add_argument("--trials", type=int, default=5, help="key-spread trials per origin")
    parser.add_argument("--rounds", type=int, default=50, help="all-to-all delivery rounds")
    parser.add_argument("--hold", type=float, action="append", default=None,
                        help="extra seconds a partition is held (repeatable; default 0 and 20)")
    parser.add_argument("--mode", action="append", choices=("drop", "down"), default=None,
                        help="how to cut (repeatable; default drop and down)")
    parser.add_argument("--failover-trials", type=int, default=2)
    args = parser.parse_args()
    holds = args.hold if args.hold is not None else [0.0, 20.0]
    modes = args.mode or ["drop", "down"]
    started = time.monotonic()
    asyncio.run(regions(args.trials, args.rounds, holds, modes))
    asyncio.run(failover(args.failover_trials))
    load = Path("/proc/loadavg").read_text().split()[0]
    out(f"(took {time.monotonic() - started:.0f} s; load average at the end {load})")
    sys.exit(0)


if __name__ == "__main__":
    main()
