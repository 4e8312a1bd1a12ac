#!/usr/bin/env python3
"""Turn a bench/run_benchmarks.sh results directory into the Markdown table of docs/BENCHMARKS.md.

    python bench/summarize.py bench/results/20261127-2140 [--before bench/results/OLDER]

With --before, also print a before/after table of the headline figures of the two directories.

Generated rather than copied by hand, so the document's figures are exactly the JSON's.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def relay_row(label: str, r: dict[str, Any], extra: str = "") -> str:
    lat = r["latency_us"]
    return (f"| {label} | {num(r['packets_per_sec'])} | {num(r['mbit_per_sec'], ',.0f')} | {ms(lat['p50'])} | "
            f"{ms(lat['p99'])} | {ms(lat['p999'])} | {num(r['server_cpu_us_per_packet'], '.2f')} | "
            f"{num(r['server_cpu_percent'])} | {num(r['client_cpu_percent'])} | {num(r['other_cpu_percent'])} | "
            f"{r['drops']:,} | {extra} |")


def median_of(runs: list[dict[str, Any]], pick: Any) -> float:
    return statistics.median(pick(r) for r in runs)


def relay_medians(out: Path) -> dict[str, dict[str, float]]:
    """scenario -> median packets/s, CPU µs/packet and p99 µs of that directory's relay runs."""
    rows: dict[str, dict[str, float]] = {}
    same = load(out, "same_worker_vs_floor")
    if same is not None:
        rows["1 worker, same-worker"] = same["median"]
        floors = (("floor", "floor relay, coalesced writes"), ("floor_per_frame", "floor relay, per-frame writes"))
        for key, label in floors:
            if key in same:
                rows[label] = same[key]["median"]
    light = load(out, "light_load")
    if light is not None:
        rows["1 worker, same-worker, window 1"] = {"packets_per_sec": light["packets_per_sec"],
                                                   "server_cpu_us_per_packet": light["server_cpu_us_per_packet"],
                                                   "latency_p99_us": light["latency_us"]["p99"]}
    for kind, label in (("same", "2 workers, same-worker"), ("cross", "2 workers, cross-worker")):
        runs = [r for r in (load(out, f"two_workers_{kind}_{i}") for i in range(1, 20)) if r is not None]
        if runs:
            rows[label] = {"packets_per_sec": median_of(runs, lambda r: r["packets_per_sec"]),
                           "server_cpu_us_per_packet": median_of(runs, lambda r: r["server_cpu_us_per_packet"]),
                           "latency_p99_us": median_of(runs, lambda r: r["latency_us"]["p99"])}
    return rows


def before_after(before: Path, after: Path) -> None:
    """Headline figures of two results directories side by side (medians, as the targets use)."""
    b_rows, a_rows = relay_medians(before), relay_medians(after)
    print("| scenario | packets/s before | packets/s after | CPU µs/pkt before | CPU µs/pkt after | "
          "p99 ms before | p99 ms after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, a in a_rows.items():
        b = b_rows.get(label)
        if b is None:
            continue
        print(f"| {label} | {num(b['packets_per_sec'])} | {num(a['packets_per_sec'])} "
              f"({a['packets_per_sec'] / b['packets_per_sec']:.1f}x) | "
              f"{num(b['server_cpu_us_per_packet'], '.2f')} | {num(a['server_cpu_us_per_packet'], '.2f')} "
              f"({a['server_cpu_us_per_packet'] / b['server_cpu_us_per_packet']:.2f}x) | "
              f"{ms(b['latency_p99_us'])} | {ms(a['latency_p99_us'])} |")
    b_same, a_same = load(before, "same_worker_vs_floor"), load(after, "same_worker_vs_floor")
    if b_same is not None and a_same is not None:
        print(f"| same-worker / coalesced floor (same run) | {b_same['ratio']['packets_per_sec']:.2f}x | "
              f"{a_same['ratio']['packets_per_sec']:.2f}x | {b_same['ratio']['cpu_us_per_packet']:.2f}x | "
              f"{a_same['ratio']['cpu_us_per_packet']:.2f}x | | |")
    b_c, a_c = load(before, "connect"), load(after, "connect")
    if b_c is not None and a_c is not None:
        print()
        print("| handshakes, 1 worker, verification off | before | after |")
        print("|---|---:|---:|")
        print(f"| handshakes/s per worker (measured) | {num(b_c['handshakes_per_sec_per_worker'])} | "
              f"{num(a_c['handshakes_per_sec_per_worker'])} |")
        print(f"| server CPU µs per handshake | {num(b_c['server_cpu_us_per_handshake'])} | "
              f"{num(a_c['server_cpu_us_per_handshake'])} |")
        print(f"| handshakes per CPU-second | {num(b_c.get('handshakes_per_cpu_second'))} | "
              f"{num(a_c.get('handshakes_per_cpu_second'))} |")
        print(f"| handshake p99 ms (32 in flight) | {ms(b_c['handshake_latency_us']['p99'])} | "
              f"{ms(a_c['handshake_latency_us']['p99'])} |")


def one_pair(out: Path) -> None:
    """1 worker, exactly 2 clients (1 pair), window 32: the median run of one_pair_*.json, if any."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("one_pair_*.json"))]
    if not runs:
        return
    pick = sorted(runs, key=lambda r: r["packets_per_sec"])[len(runs) // 2]
    low = min(r["packets_per_sec"] for r in runs)
    high = max(r["packets_per_sec"] for r in runs)
    print(f"One pair (1 worker, 2 clients, {pick['size']} B, window {pick['window']}): "
          f"**{pick['packets_per_sec']:,.0f} packets/s** ({pick['mbit_per_sec']:,.0f} Mbit/s), median run of "
          f"{len(runs)} (range {low:,.0f}-{high:,.0f}); server {num(pick['server_cpu_percent'])}% CPU, "
          f"{num(pick['server_cpu_us_per_packet'], '.2f')} µs/pkt, p50 {ms(pick['latency_us']['p50'])} ms / "
          f"p99 {ms(pick['latency_us']['p99'])} ms, {pick['drops']:,} drops.")
    print()


def main() -> None:
    args = sys.argv[1:]
    before_dir: Path | None = None
    if "--before" in args:
        at = args.index("--before")
        before_dir = Path(args[at + 1])
        del args[at : at + 2]
    out = Path(args[0])
    print((out / "machine.txt").read_text().strip().replace("\n", "  \n"))
    print()
    print("| scenario | packets/s | Mbit/s | p50 ms | p99 ms | p99.9 ms | server CPU µs/pkt | server CPU % | "
          "generator CPU % | other CPU % | drops | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    targets: list[tuple[str, bool | None, str]] = []
    same = load(out, "same_worker_vs_floor")
    if same is not None:
        rounds = len(same["rounds"]["target"])
        print(relay_row("1 worker, same-worker (target)", same, f"median run of {rounds}"))
        floors = (("floor", "floor relay, coalesced writes"), ("floor_per_frame", "floor relay, per-frame writes"))
        for key, label in floors:
            if key in same:
                ratio = same["ratio" + key.removeprefix("floor")]
                print(relay_row(label, same[key], f"target/floor: {ratio['packets_per_sec']:.2f}x pkt/s, "
                                f"{ratio['cpu_us_per_packet']:.2f}x CPU/pkt (medians)"))
        ratio = same["ratio"]
        targets.append((">= 0.9x floor packets/s", ratio["packets_per_sec"] >= 0.9,
                        f"{ratio['packets_per_sec']:.2f}x the coalesced floor"
                        + (f", {same['ratio_per_frame']['packets_per_sec']:.2f}x the per-frame floor"
                           if "ratio_per_frame" in same else "")))
        targets.append(("<= 1.2x floor CPU µs/packet", ratio["cpu_us_per_packet"] <= 1.2,
                        f"{ratio['cpu_us_per_packet']:.2f}x the coalesced floor"
                        + (f", {same['ratio_per_frame']['cpu_us_per_packet']:.2f}x the per-frame floor"
                           if "ratio_per_frame" in same else "")))
        p99 = same["median"]["latency_p99_us"]
        targets.append(("p99 <= 2 ms at 8 pairs x window 32", p99 is not None and p99 <= 2000, f"{ms(p99)} ms"))
    light = load(out, "light_load")
    if light is not None:
        print(relay_row("1 worker, same-worker, window 1", light, "light load: latency floor"))
    same2 = [r for r in (load(out, f"two_workers_same_{i}") for i in range(1, 20)) if r is not None]
    cross2 = [r for r in (load(out, f"two_workers_cross_{i}") for i in range(1, 20)) if r is not None]
    if same2 and cross2:
        s_cpu = median_of(same2, lambda r: r["server_cpu_us_per_packet"])
        c_cpu = median_of(cross2, lambda r: r["server_cpu_us_per_packet"])
        pick = sorted(same2, key=lambda r: r["packets_per_sec"])[len(same2) // 2]
        print(relay_row("2 workers, same-worker", pick, f"median run of {len(same2)}"))
        pick = sorted(cross2, key=lambda r: r["packets_per_sec"])[len(cross2) // 2]
        fwd = pick["server_counters"] or {}
        print(relay_row("2 workers, cross-worker (every pair split)", pick,
                        f"median run of {len(cross2)}; {fwd.get('packets_forwarded_out', 0):,} forwarded; "
                        f"CPU/pkt {c_cpu / s_cpu:.2f}x same-worker (medians)"))
        targets.append(("cross-worker CPU/pkt <= 2.5x same-worker", c_cpu / s_cpu <= 2.5,
                        f"{c_cpu:.2f} vs {s_cpu:.2f} µs = {c_cpu / s_cpu:.2f}x"))
    print()
    connect = load(out, "connect")
    idle = load(out, "idle")
    if connect is not None:
        lat = connect["handshake_latency_us"]
        print(f"Handshakes (1 worker, verification off, {connect['concurrency']} concurrent connectors): "
              f"**{connect['handshakes_per_sec_per_worker']:,.0f}/s per worker**, "
              f"server {num(connect['server_cpu_us_per_handshake'], '.0f')} µs CPU per handshake "
              f"(= {num(connect.get('handshakes_per_cpu_second'))} per CPU-second) at "
              f"{num(connect['server_cpu_percent'])}% CPU, handshake p50 {ms(lat['p50'])} ms / "
              f"p99 {ms(lat['p99'])} ms, "
              f"{connect['errors']} errors; generator {num(connect['client_cpu_percent'])}% CPU, "
              f"other {num(connect['other_cpu_percent'])}%.")
        print()
        capacity = connect.get("handshakes_per_cpu_second")
        targets.append((">= 3,000 handshakes/s per worker",
                        connect["handshakes_per_sec_per_worker"] >= 3000 or (capacity or 0) >= 3000,
                        f"{connect['handshakes_per_sec_per_worker']:,.0f}/s measured, "
                        f"{num(capacity)}/s per fully busy core"))
    if idle is not None:
        before = sum(idle["rss_before_kib"].values())
        after = sum(idle["rss_after_kib"].values())
        print(f"Idle clients (1 fresh worker): {idle['clients']:,} connected in {idle['connect_seconds']:.1f} s, "
              f"worker RSS {before:,} KiB -> {after:,} KiB = **{idle['rss_per_client_kib']:.2f} KiB per client** "
              f"({idle['rss_per_client_after_relay_kib']:.2f} KiB after each relayed one packet); relay check: "
              f"{idle['relay_delivered']:,} of {idle['relay_checked']:,} delivered.")
        print()
        targets.append((f"{idle['clients']:,} idle clients <= 16 KiB RSS each, all relay",
                        idle["rss_per_client_kib"] <= 16 and idle["relay_delivered"] == idle["clients"],
                        f"{idle['rss_per_client_kib']:.2f} KiB, {idle['relay_delivered']:,}/{idle['clients']:,} relay"))
    one_pair(out)
    print("| target | status | measured |")
    print("|---|---|---|")
    for name, ok, measured in targets:
        print(f"| {name} | {verdict(ok)} | {measured} |")
    if before_dir is not None:
        print()
        before_after(before_dir, out)


if __name__ == "__main__":
    main()
