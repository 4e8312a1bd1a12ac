"""One load-generator process: holds DERP connections and runs the commands the parent sends.

The parent (runner.py) talks to each agent over a multiprocessing Pipe with one command at a time:
(name, kwargs) in, ("result", value) or ("error", text) out, with ("progress", n) messages in
between so the parent can draw a progress bar. Deadlines are absolute CLOCK_MONOTONIC times chosen
by the parent, so every agent starts and stops measuring at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
import traceback
from collections import defaultdict
from multiprocessing.connection import Connection
from typing import Any

from .wire import BenchConn, ClientKey, open_conn, parse_url, upgrade_request

PROGRESS_EVERY = 0.2


def raise_nofile_limit() -> int:
    """Lift the soft open-files limit to the hard one: idle mode holds thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


async def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class Flow:
    """Closed loop for one pair: each packet the receiver gets lets the sender put one more in flight."""

    __slots__ = ("agent", "sender")

    def __init__(self, agent: Agent, sender: BenchConn) -> None:
        self.agent = agent
        self.sender = sender

    def __call__(self, n: int) -> None:
        agent = self.agent
        if agent.sending:
            self.sender.send_batch(n)
            agent.sent += n


class Agent:
    def __init__(self, pipe: Connection, url: str, fast_start: bool) -> None:
        self.pipe = pipe
        self.host, self.port, path = parse_url(url)
        self.fast_start = fast_start
        self.request = upgrade_request(self.host, self.port, path, fast_start=fast_start)
        self.conns: dict[int, BenchConn] = {}
        self.next_id = 0
        self.sending = False
        self.sent = 0
        self.progress = 0
        self.done: asyncio.Future[None] | None = None

    # -- plumbing -----------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

        def readable() -> None:
            try:
                while self.pipe.poll():
                    queue.put_nowait(self.pipe.recv())
            except (EOFError, OSError):  # the parent went away: stop
                queue.put_nowait(("exit", {}))

        loop.add_reader(self.pipe.fileno(), readable)
        reporter = asyncio.create_task(self._report_progress())
        try:
            while True:
                name, kwargs = await queue.get()
                if name == "exit":
                    break
                try:
                    result = await getattr(self, "cmd_" + name)(**kwargs)
                except Exception:
                    self.pipe.send(("error", traceback.format_exc()))
                else:
                    self.pipe.send(("result", result))
        finally:
            reporter.cancel()
            loop.remove_reader(self.pipe.fileno())
            for conn in self.conns.values():
                conn.close()

    async def _report_progress(self) -> None:
        last = -1
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            if self.progress != last:
                last = self.progress
                with contextlib.suppress(OSError):
                    self.pipe.send(("progress", last))

    # -- connections --------------------------------------------------------------------------------

    async def _connect_one(self, url: str | None = None) -> int:
        if url is None:
            host, port, request = self.host, self.port, self.request
        else:  # the far end of a cross-node pair
            host, port, path = parse_url(url)
            request = upgrade_request(host, port, path, fast_start=self.fast_start)
        conn = await open_conn(host, port, request, ClientKey(), fast_start=self.fast_start)
        conn_id = self.next_id
        self.next_id += 1
        self.conns[conn_id] = conn
        return conn_id

    async def cmd_connect(self, count: int, concurrency: int = 64, url: str | None = None) -> list[int]:
        """Open `count` clients (to `url` if given), at most `concurrency` handshakes at a time."""
        self.progress = 0
        ids: list[int] = []
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                ids.append(await self._connect_one(url))
                self.progress += 1

        await asyncio.gather(*(one() for _ in range(count)))
        return ids

    async def cmd_close(self, ids: list[int]) -> int:
        conns = [self.conns.pop(i) for i in ids if i in self.conns]
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.closed, 5)
        return len(conns)

    async def cmd_close_all(self) -> int:
        return await self.cmd_close(list(self.conns))

    async def cmd_alive(self) -> int:
        return sum(1 for conn in self.conns.values() if conn.transport is not None)

    # -- relay --------------------------------------------------------------------------------------

    async def cmd_relay(self, pairs: list[tuple[int, int]], size: int, window: int, t_start: float,
                        t_measure: float, t_end: float, drain: float) -> dict[str, Any]:
        """Closed-loop relay of `size`-byte packets from a to b for every pair, `window` in flight each."""
        hist: defaultdict[int, int] = defaultdict(int)
        receivers = [self.conns[b] for _, b in pairs]
        for a, b in pairs:
            sender, receiver = self.conns[a], self.conns[b]
            sender.aim(receiver.key.public, size)
            receiver.latency_us = hist
            receiver.on_packets = Flow(self, sender)

        def received() -> int:
            return sum(r.received for r in receivers)

        base = received()
        self.sent = 0
        await sleep_until(t_start)
        self.sending = True
        self.progress = 0
        for a, _ in pairs:
            self.conns[a].send_batch(window)
            self.sent += window

        progress_task = asyncio.create_task(self._track(lambda: received() - base))
        await sleep_until(t_measure)
        start_received, start_sent = received(), self.sent
        for r in receivers:
            r.measuring = True
        await sleep_until(t_end)
        window_received, window_sent = received() - start_received, self.sent - start_sent
        for r in receivers:
            r.measuring = False
        self.sending = False
        # Drain: whatever is still in flight either arrives now or counts as dropped.
        deadline = time.monotonic() + drain
        while received() - base < self.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        progress_task.cancel()
        for r in receivers:
            r.on_packets = None
            r.latency_us = None
        return {
            "window_received": window_received,
            "window_sent": window_sent,
            "sent": self.sent,
            "received": received() - base,
            "latency_us": dict(hist),
            "peer_gone": sum(r.peer_gone for r in receivers),
            "lost_connections": sum(1 for a, b in pairs
                                    for c in (self.conns[a], self.conns[b]) if c.transport is None),
        }

    async def _track(self, value: Any) -> None:
        while True:
            self.progress = value()
            await asyncio.sleep(PROGRESS_EVERY / 2)

    # -- idle ---------------------------------------------------------------------------------------

    async def cmd_ring(self, timeout: float = 30.0) -> dict[str, int]:
        """Every open client sends one packet to the next one in this process; count who got theirs."""
        conns = [c for c in self.conns.values() if c.transport is not None]
        if not conns:
            return {"clients": 0, "delivered": 0}
        base = [c.received for c in conns]
        for i, conn in enumerate(conns):
            conn.send_to(conns[(i + 1) % len(conns)].key.public, b"ring" + i.to_bytes(4, "big"))
        deadline = time.monotonic() + timeout
        while True:
            delivered = sum(1 for c, b in zip(conns, base, strict=True) if c.received > b)
            self.progress = delivered
            if delivered == len(conns) or time.monotonic() > deadline:
                return {"clients": len(conns), "delivered": delivered}
            await asyncio.sleep(0.02)

    # -- handshakes ---------------------------------------------------------------------------------

    async def cmd_handshakes(self, concurrency: int, t_start: float, t_measure: float, t_end: float,
                             pool: int = 2048) -> dict[str, Any]:
        """Open, handshake and close connections from `concurrency` loops until t_end."""
        # Distinct keys (so the server never sees a duplicate connection), their boxes computed
        # before the clock starts: the generator should spend its CPU on sockets, not on Curve25519.
        keys = [ClientKey() for _ in range(pool)]
        probe = await open_conn(self.host, self.port, self.request, keys[0], fast_start=self.fast_start)
        probe.close()
        for key in keys:
            key.box(probe.server_public)
        hist: defaultdict[int, int] = defaultdict(int)
        counters = {"done": 0, "window": 0, "errors": 0}
        state = {"next_key": 0, "measuring": False}
        errors: dict[str, int] = {}

        async def loop_once() -> None:
            while time.monotonic() < t_end:
                key = keys[state["next_key"] % pool]
                state["next_key"] += 1
                t0 = time.monotonic_ns()
                try:
                    conn = await open_conn(self.host, self.port, self.request, key, fast_start=self.fast_start)
                except (TimeoutError, OSError, ConnectionError) as exc:
                    counters["errors"] += 1
                    name = type(exc).__name__
                    errors[name] = errors.get(name, 0) + 1
                    await asyncio.sleep(0.01)  # do not spin on a refusing server
                    continue
                elapsed_us = (time.monotonic_ns() - t0) // 1000
                conn.close()
                counters["done"] += 1
                self.progress = counters["done"]
                if state["measuring"]:
                    counters["window"] += 1
                    hist[elapsed_us] += 1
                await conn.closed

        async def clock() -> None:
            await sleep_until(t_measure)
            state["measuring"] = True
            await sleep_until(t_end)
            state["measuring"] = False

        await sleep_until(t_start)
        self.progress = 0
        await asyncio.gather(clock(), *(loop_once() for _ in range(concurrency)))
        return {"handshakes": counters["done"], "window_handshakes": counters["window"],
                "errors": counters["errors"], "error_kinds": errors, "latency_us": dict(hist)}


def agent_main(pipe: Connection, url: str, fast_start: bool) -> None:
    """multiprocessing entry point (spawned, so nothing of the parent's state leaks in)."""
    raise_nofile_limit()
    agent = Agent(pipe, url, fast_start)
    try:
        import uvloop
    except ImportError:  # still works, just a slower generator
        asyncio.run(agent.run())
    else:
        uvloop.run(agent.run())
