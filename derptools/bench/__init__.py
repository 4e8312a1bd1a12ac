"""`cluster bench relay|connect|idle`: a DERP load generator that is not the bottleneck.

Several processes (`--procs`), each a uvloop event loop of raw asyncio Protocols with bulk frame
parsing; closed loop (`--window` packets in flight per pair) so that latency measures the relay,
not a queue the generator built up. Server CPU is read from /proc/PID/stat of the server's own
processes (the workers, from the run dir's supervisor.json, or `--server-pids`), so CPU per packet
is what the relay spent, whatever the generator cost the shared machine. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:3340/derp"


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = subparsers.add_parser("bench", help="load-test a DERP server (relay, connect, idle)",
                                  description=__doc__.split("\n\n")[0] if __doc__ else None)
    modes = bench.add_subparsers(dest="bench_mode", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=DEFAULT_URL, help="DERP URL of the server (default %(default)s)")
        p.add_argument("--procs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                       help="load-generator processes (default: cores, at most 4)")
        p.add_argument("--run-dir", type=Path, help="the cluster's run dir: worker pids and admin sockets "
                       "(default: DERP_RUN_DIR / the default run dir, if it serves --url's port)")
        p.add_argument("--server-pids", help="comma-separated pids to charge CPU/RSS to (instead of --run-dir)")
        p.add_argument("--fast-start", action="store_true", help="send Derp-Fast-Start: 1 (no HTTP 101 reply)")
        p.add_argument("--json", action="store_true", help="one JSON document on stdout, no table or progress")

    relay = modes.add_parser("relay", help="packets/s, Mbit/s, one-way latency and drops of N pairs")
    common(relay)
    relay.add_argument("--pairs", type=int, default=8)
    relay.add_argument("--size", type=int, default=1200, help="packet payload bytes (default %(default)s)")
    relay.add_argument("--seconds", type=float, default=5.0, help="measured seconds (default %(default)s)")
    relay.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (default %(default)s)")
    relay.add_argument("--window", type=int, default=32, help="packets in flight per pair (default %(default)s)")
    relay.add_argument("--drain", type=float, default=2.0, help="seconds to wait for in-flight packets at the end")
    where = relay.add_mutually_exclusive_group()
    where.add_argument("--same-worker", dest="placement", action="store_const", const="same-worker",
                       help="both ends of every pair on one worker (pairs spread over workers)")
    where.add_argument("--cross-worker", dest="placement", action="store_const", const="cross-worker",
                       help="the two ends of every pair on different workers")
    relay.add_argument("--peer-url", help="connect the second end of every pair here: another node of the "
                       "cluster, for cross-node relay (charge both nodes' workers with --server-pids)")
    relay.add_argument("--compare-floor", action="store_true",
                       help="also run the identical load against bench/floor_relay.py and print the ratios")
    relay.add_argument("--floor-mode", choices=["coalesced", "per-frame", "both"], default="both",
                       help="which floor relay(s) to compare with: one write per destination per read "
                       "(coalesced), one write per packet (per-frame), or both (default)")
    relay.add_argument("--rounds", type=int, default=1,
                       help="with --compare-floor: alternate floor and target runs this many times and "
                       "compare medians (damps noise from other load on the machine)")
    relay.set_defaults(func=cmd_bench, placement="unpinned")

    connect = modes.add_parser("connect", help="handshakes per second: open + upgrade + handshake + close")
    common(connect)
    connect.add_argument("--concurrency", type=int, default=32, help="connections being opened at once")
    connect.add_argument("--seconds", type=float, default=5.0)
    connect.add_argument("--warmup", type=float, default=1.0)
    connect.set_defaults(func=cmd_bench)

    idle = modes.add_parser("idle", help="server RSS per idle client; then check that every client still relays")
    common(idle)
    idle.add_argument("--clients", type=int, default=1000)
    idle.add_argument("--concurrency", type=int, default=256, help="handshakes in progress at once (all procs)")
    idle.add_argument("--settle", type=float, default=1.0, help="seconds between connecting and reading RSS")
    idle.set_defaults(func=cmd_bench)

    from .soak import add_soak_parser

    add_soak_parser(modes)


def _find_cluster(args: argparse.Namespace) -> Any:
    """The ClusterInfo of the server at --url, or None when it is not a `cluster up` we can see."""
    from .procfs import ClusterInfo

    run_dir: Path | None = args.run_dir
    if run_dir is None:
        from cluster.config import ConfigError, load_config

        try:
            candidate = load_config(None, os.environ, {}).run_path
        except ConfigError:
            return None
        state = candidate / "supervisor.json"
        if not state.exists():
            return None
        # Only adopt the default run dir when it belongs to the server at --url.
        try:
            listen = json.loads(state.read_text())["listen"]
        except (OSError, ValueError, KeyError):
            return None
        if str(listen).rpartition(":")[2] != str(urlsplit(args.url).port or 80):
            return None
        run_dir = candidate
    return ClusterInfo.load(run_dir)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import report, runner

    cluster = _find_cluster(args)
    if args.server_pids:
        pids = [int(p) for p in args.server_pids.split(",") if p.strip()]
    else:
        pids = cluster.worker_pids if cluster is not None else []
    if getattr(args, "placement", "unpinned") != "unpinned" and cluster is None:
        print(f"cluster bench: --{args.placement} needs the cluster's --run-dir (to tell workers apart)",
              file=sys.stderr)
        return 2
    target = runner.Target("target", args.url, pids, cluster)
    ui = report.Ui(enabled=not args.json)
    result: dict[str, Any]
    with ui:
        if args.bench_mode == "relay":
            def relay_on(t: runner.Target, placement: str) -> dict[str, Any]:
                return runner.run_relay(t, pairs=args.pairs, size=args.size, window=args.window,
                                        seconds=args.seconds, warmup=args.warmup, procs=args.procs,
                                        placement=placement, drain=args.drain, fast_start=args.fast_start,
                                        progress=ui.progress_for(t.label),
                                        peer_url=args.peer_url if t is target else None)

            if args.compare_floor:
                floors = {"coalesced": [False], "per-frame": [True], "both": [False, True]}[args.floor_mode]
                runs: dict[str, list[dict[str, Any]]] = {}
                for _ in range(max(1, args.rounds)):
                    # Floors first in each round: they are the reference, and a target that breaks
                    # mid-run still leaves them measured. Alternating rounds spreads any drift in
                    # the machine's other load over both sides.
                    for per_frame in floors:
                        with runner.floor_relay(per_frame_writes=per_frame) as floor_target:
                            runs.setdefault(floor_target.label, []).append(relay_on(floor_target, "unpinned"))
                    runs.setdefault("target", []).append(relay_on(target, args.placement))
                result = report.combine(runs)
            else:
                result = relay_on(target, args.placement)
        elif args.bench_mode == "connect":
            result = runner.run_connect(target, concurrency=args.concurrency, seconds=args.seconds,
                                        warmup=args.warmup, procs=args.procs, fast_start=args.fast_start,
                                        progress=ui.progress_for(target.label))
        else:
            result = runner.run_idle(target, clients=args.clients, procs=args.procs, concurrency=args.concurrency,
                                     settle=args.settle, fast_start=args.fast_start,
                                     progress=ui.progress_for(target.label))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        report.render(result)
    return 0
