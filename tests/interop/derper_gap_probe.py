"""Runs inside the test's namespace: one receiver on a stock derper, senders on our node, each
sender sending a numbered packet every interval; prints `ready` once the receiver has heard every
sender, then after --duration more seconds one JSON line: per sender, whether its connection
survived, how many packets arrived, and the arrival times (wall clock), so the test can measure
the longest gap around an event it caused (killing a worker).

    python -m tests.interop.derper_gap_probe --derper URL --ours URL [--senders 8] [--duration 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time

from relay_worker.client import DerpClient, RecvPacket


async def main(args: argparse.Namespace) -> None:
    receiver = await DerpClient.connect(args.derper)
    senders = [await DerpClient.connect(args.ours) for _ in range(args.senders)]
    arrivals: list[list[float]] = [[] for _ in senders]
    survived = [True] * len(senders)
    index = {client.public_key: i for i, client in enumerate(senders)}

    async def receive() -> None:
        while True:
            event = await receiver.recv()
            if isinstance(event, RecvPacket) and event.src in index:
                arrivals[index[event.src]].append(time.time())

    async def send(i: int) -> None:
        client = senders[i]
        try:
            while True:
                client.send_nowait(receiver.public_key, b"gap probe %d" % i)
                await client.flush()
                await asyncio.sleep(args.interval)
        except Exception:  # its connection ended (the worker it landed on was killed)
            survived[i] = False

    async def watch(i: int) -> None:
        """A sender whose connection ends (its worker was killed) is not counted afterwards."""
        with contextlib.suppress(Exception):
            while True:
                await senders[i].recv()
        survived[i] = False

    tasks = [asyncio.create_task(receive())]
    tasks += [asyncio.create_task(send(i)) for i in range(len(senders))]
    tasks += [asyncio.create_task(watch(i)) for i in range(len(senders))]
    deadline = time.monotonic() + 30
    while not all(arrivals) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    print("ready" if all(arrivals) else "not ready", flush=True)
    await asyncio.sleep(args.duration)
    for task in tasks:
        task.cancel()
    print(json.dumps({"senders": [{"key": senders[i].public_key.hex(), "survived": survived[i],
                                    "arrivals": arrivals[i]} for i in range(len(senders))]}), flush=True)
    for client in [receiver, *senders]:
        with contextlib.suppress(Exception):
            await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--derper", required=True)
    parser.add_argument("--ours", required=True)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--duration", type=float, default=15.0)
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
