"""How soon a client that just connected to one node of a region is reachable from another node.

Run inside a test's namespace (`python -m tests.interop.reach ...`): each trial does what
derpprobe's cross-node mesh probe does (prober/derp.go derpProbeNodePair): a fresh client A
connects to the first node and gets ServerInfo, then a fresh client B connects to the second node
and gets ServerInfo. derpprobe then waits 100 ms and sends one packet; here A sends a numbered
packet every millisecond from B's ServerInfo on, until B receives one. The trial's figure is when
the first delivered packet was sent, counted from B's ServerInfo: the minimal delay after which a
packet sent A -> B is delivered (an upper bound by about a millisecond). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import time

from relay_worker.client import DerpClient, DerpClientError

#: derpprobe's wait between connecting B and sending (prober/derp.go, "pretty arbitrary")
PROBE_WAIT = 0.1
#: a trial whose packet is not delivered within this long counts as unreachable
GIVE_UP = 5.0


async def connect_when_up(url: str, ctx: ssl.SSLContext | None, wait: bool) -> DerpClient:
    """Connect; with wait, retry until the node accepts (the node is being started right now)."""
    deadline = time.monotonic() + 60
    while True:
        started = time.monotonic()
        try:
            client = await DerpClient.connect(url, ssl_context=ctx, is_prober=True)
            if wait:
                first_connect.append(time.monotonic() - started)
            return client
        except (OSError, DerpClientError):
            if not wait or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


#: how long the first trial's connect to the starting node took, from its first accepted attempt
#: (TLS, upgrade and the wait for ServerInfo: what the join gate adds shows up here)
first_connect: list[float] = []


async def trial(from_url: str, to_url: str, index: int, ctx: ssl.SSLContext | None, *, at_start: str = ""
                ) -> float | None:
    """One probe; at_start ("from" or "to") names the node that is starting while this trial begins."""
    a = await connect_when_up(from_url, ctx, at_start == "from")
    try:
        b = await connect_when_up(to_url, ctx, at_start == "to")
        ready = time.monotonic()
        try:
            receiver = asyncio.create_task(b.recv_packet(timeout=GIVE_UP + 1))
            sent_at: list[float] = []
            while not receiver.done() and time.monotonic() - ready < GIVE_UP:
                sent_at.append(time.monotonic())
                await a.send(b.public_key, f"{index}:{len(sent_at) - 1}".encode())
                await asyncio.wait({receiver}, timeout=0.001)
            try:
                packet = await receiver
            except TimeoutError:
                return None
            if packet.src != a.public_key:
                raise AssertionError(f"trial {index}: packet from an unexpected source")
            return sent_at[int(packet.data.decode().split(":")[1])] - ready
        finally:
            await b.close()
    finally:
        await a.close()


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


async def measure(from_url: str, to_url: str, trials: int, ca_file: str, at_start: str) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else None
    delays = [await trial(from_url, to_url, i, ctx, at_start=at_start if i == 0 else "") for i in range(trials)]
    reached = sorted(d * 1000 for d in delays if d is not None)
    summary: dict[str, object] = {"from": from_url, "to": to_url, "trials": trials, "reached": len(reached),
                                  "first_ms": None if delays[0] is None else round(delays[0] * 1000, 2)}
    if first_connect:
        summary["starting_node_connect_ms"] = round(first_connect[0] * 1000, 1)
    if reached:
        summary.update(p50_ms=round(statistics.median(reached), 2), p99_ms=round(percentile(reached, 0.99), 2),
                       max_ms=round(reached[-1], 2),
                       over_probe_wait=sum(1 for d in reached if d > PROBE_WAIT * 1000))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="from_url", required=True, help="DERP URL of the node A connects to")
    parser.add_argument("--to", dest="to_url", required=True, help="DERP URL of the node B connects to")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--ca-file", default="", help="CA that signed the nodes' certificates")
    parser.add_argument("--at-start", choices=("from", "to"), default="",
                        help="that node is being started: the first trial connects to it as soon as it accepts")
    args = parser.parse_args(argv)
    summary = asyncio.run(measure(args.from_url, args.to_url, args.trials, args.ca_file, args.at_start))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
