"""`cluster bench soak --minutes M`: a long mixed run against a cluster this command starts itself.

Pairs relay at a steady paced rate while clients come and go and workers are killed (-9) and
restarted by the supervisor. Every packet names its source pair, destination key and sequence
number, so any packet that reaches the wrong key (a misdelivery, which must never happen) or
arrives from the wrong source is counted. Reports drops by reason (summed over worker restarts),
misdeliveries, reconnects, and each worker's RSS over time; exits 1 on any misdelivery.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.status import fetch_unix
from relay_worker.client import DerpClient, DerpClientError, RecvPacket
from relay_worker.keys import PrivateKey


@dataclass
class SoakCounters:
    sent: int = 0
    received: int = 0
    misdelivered: int = 0
    wrong_source: int = 0
    reconnects: int = 0
    churned: int = 0
    kills: int = 0
    connect_failures: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    rss_kib: list[dict[str, Any]] = field(default_factory=list)


class SoakPeer:
    """One end of a pair: a key, a connection (replaced on churn or failure), a reader task."""

    def __init__(self, url: str, index: int, counters: SoakCounters) -> None:
        self.url = url
        self.index = index
        self.key = PrivateKey.generate()
        self.public = self.key.public().raw
        self.counters = counters
        self.client: DerpClient | None = None
        self.reader: asyncio.Task[None] | None = None
        self.partner_public = b""

    async def connect(self) -> None:
        while True:
            try:
                self.client = await DerpClient.connect(self.url, self.key, timeout=5)
                break
            except (DerpClientError, OSError, TimeoutError):
                self.counters.connect_failures += 1
                await asyncio.sleep(0.2)
        self.reader = asyncio.create_task(self._read(self.client))

    async def reconnect(self) -> None:
        await self.close()
        self.counters.reconnects += 1
        await self.connect()

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.client is not None:
            await self.client.close()
        self.client = None

    async def _read(self, client: DerpClient) -> None:
        counters = self.counters
        try:
            while True:
                event = await client.recv()
                if not isinstance(event, RecvPacket):
                    continue
                counters.received += 1
                dst_hex = event.data[:64]
                if dst_hex != self.public.hex().encode():
                    counters.misdelivered += 1
                elif event.src != self.partner_public:
                    counters.wrong_source += 1
        except (DerpClientError, OSError, TimeoutError, asyncio.IncompleteReadError):
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.reconnect()))

    def send(self, seq: int) -> None:
        client = self.client
        if client is None or client.closed:
            return
        payload = self.partner_public.hex().encode() + b"|%d|%d|" % (self.index, seq) + b"x" * 200
        try:
            client.send_nowait(self.partner_public, payload)
            self.counters.sent += 1
        except (OSError, RuntimeError):
            pass


def _worker_docs(run_dir: Path, workers: int) -> list[dict[str, Any]]:
    docs = []
    for index in range(workers):
        try:
            docs.append(json.loads(fetch_unix(run_dir / f"worker-{index}.sock", "/debug/varz")))
        except (OSError, ValueError):
            docs.append({})
    return docs


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.counters = SoakCounters()
        self.tmp = tempfile.TemporaryDirectory(prefix="derp-soak-")
        self.run_dir = Path(self.tmp.name) / "run"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.last_drops: dict[int, dict[str, int]] = {}
        self.last_pids: dict[int, int] = {}

    def start_cluster(self) -> str:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        cmd = [sys.executable, "-m", "cluster", "up", "--listen", f"127.0.0.1:{self.port}", "--no-stun",
               "--workers", str(self.args.workers), "--state-dir", str(Path(self.tmp.name) / "state"),
               "--run-dir", str(self.run_dir), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            docs = _worker_docs(self.run_dir, self.args.workers) if (self.run_dir / "supervisor.json").exists() else []
            if docs and all(docs):
                return f"http://127.0.0.1:{self.port}/derp"
            time.sleep(0.2)
        raise SystemExit("soak: cluster did not start")

    def pids(self) -> list[int]:
        try:
            doc = json.loads((self.run_dir / "supervisor.json").read_text())
        except (OSError, ValueError):
            return []
        return [worker["pid"] for worker in doc["workers"]]

    def collect_drops(self) -> None:
        """Fold each worker's drop counters in; a restarted worker starts from zero again."""
        for index, doc in enumerate(_worker_docs(self.run_dir, self.args.workers)):
            if not doc:
                continue
            pid = doc.get("pid", 0)
            drops = doc["worker"]["drops"]
            previous = self.last_drops.get(index, {}) if self.last_pids.get(index) == pid else {}
            for reason, count in drops.items():
                delta = count - previous.get(reason, 0)
                if delta > 0:
                    self.counters.drops[reason] = self.counters.drops.get(reason, 0) + delta
            self.last_drops[index] = dict(drops)
            self.last_pids[index] = pid

    async def run(self) -> int:
        args = self.args
        url = self.start_cluster()
        peers = [SoakPeer(url, i, self.counters) for i in range(2 * args.pairs)]
        for a, b in zip(peers[::2], peers[1::2], strict=True):
            a.partner_public, b.partner_public = b.public, a.public
        await asyncio.gather(*(peer.connect() for peer in peers))
        started = time.monotonic()
        end = started + args.minutes * 60
        next_kill = started + args.kill_every
        next_churn = started + args.churn_every
        next_sample = started
        seq = 0
        interval = 1.0 / args.rate
        rng = random.Random(args.seed)
        try:
            while time.monotonic() < end:
                seq += 1
                for peer in peers:
                    peer.send(seq)
                for peer in peers:
                    if peer.client is not None and not peer.client.closed:
                        with contextlib.suppress(OSError, RuntimeError, DerpClientError):
                            await peer.client.flush()
                now = time.monotonic()
                if now >= next_churn:
                    next_churn = now + args.churn_every
                    for peer in rng.sample(peers, max(1, len(peers) // 10)):
                        self.counters.churned += 1
                        await peer.reconnect()
                if now >= next_kill and args.kill_every > 0:
                    next_kill = now + args.kill_every
                    self.collect_drops()
                    pids = [p for p in self.pids() if p]
                    if pids:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        self.counters.kills += 1
                if now >= next_sample:
                    next_sample = now + args.sample_every
                    self.collect_drops()
                    self.counters.rss_kib.append({"t": round(now - started), **{
                        str(pid): _rss_kib(pid) for pid in self.pids() if pid}})
                    if not args.json:
                        print(f"[{now - started:7.0f}s] sent={self.counters.sent} received={self.counters.received} "
                              f"misdelivered={self.counters.misdelivered} kills={self.counters.kills} "
                              f"rss_kib={self.counters.rss_kib[-1]}", flush=True)
                await asyncio.sleep(interval)
            await asyncio.sleep(2.0)  # let in-flight packets land
            self.collect_drops()
        finally:
            for peer in peers:
                await peer.close()
            if self.proc is not None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            self.tmp.cleanup()
        report = {"minutes": args.minutes, "workers": args.workers, "pairs": args.pairs,
                  "rate_per_peer": args.rate, **self.counters.__dict__}
        if args.json:
            print(json.dumps(report))
        else:
            print(json.dumps({k: v for k, v in report.items() if k != "rss_kib"}, indent=2))
            first, last = self.counters.rss_kib[0], self.counters.rss_kib[-1]
            print(f"RSS first sample {first}, last sample {last}")
        return 1 if self.counters.misdelivered or self.counters.wrong_source else 0


def add_soak_parser(modes: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    soak = modes.add_parser("soak", help="long mixed run: relay, churn, worker kills; misdeliveries must be 0")
    soak.add_argument("--minutes", type=float, default=5.0)
    soak.add_argument("--workers", type=int, default=2)
    soak.add_argument("--pairs", type=int, default=20)
    soak.add_argument("--rate", type=float, default=50.0, help="packets per second per peer")
    soak.add_argument("--kill-every", type=float, default=60.0, help="seconds between kill -9 of a worker (0 = never)")
    soak.add_argument("--churn-every", type=float, default=5.0, help="seconds between reconnecting 10%% of peers")
    soak.add_argument("--sample-every", type=float, default=30.0, help="seconds between RSS samples")
    soak.add_argument("--seed", type=int, default=1)
    soak.add_argument("--json", action="store_true")
    soak.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    from relay_worker import loop

    return int(loop.run(Soak(args).run()))
