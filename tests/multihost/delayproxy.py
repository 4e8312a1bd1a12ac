"""A user-space TCP delay proxy (tc netem is not available): run inside a node's namespace, it
listens on another node's public address and forwards to that node's link address, holding every
chunk for a fixed one-way delay in each direction.

    python -m tests.multihost.delayproxy --route 203.0.113.1:7100:2=192.0.2.1:0.015 [--route ...]

A route is LISTEN_HOST:BASE_PORT:COUNT=TARGET_HOST[:TARGET_BASE]:DELAY_SECONDS and covers
BASE_PORT .. BASE_PORT+COUNT-1 (one mesh port per worker) onto the same ports of TARGET_HOST (or
from TARGET_BASE on). Each chunk is
timestamped when read and written when its delay has passed, in order; a direction holds at most
MAX_HELD bytes (reading stops until the writer catches up), so a stalled link backs up into the
sender's socket as a real one would. `--echo PORT` also serves a TCP echo (to measure the proxy
itself). Prints `ready` once every listener is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from collections import deque

MAX_HELD = 4 << 20
CHUNK = 1 << 16


class Pipe:
    """One direction: reader -> (timestamped chunks) -> writer, delay later, byte order kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        self.reader, self.writer, self.delay = reader, writer, delay
        self.held: deque[tuple[float, bytes]] = deque()
        self.held_bytes = 0
        self.eof = False
        self.more = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(CHUNK)
                if not data:
                    break
                self.held.append((loop.time() + self.delay, data))
                self.held_bytes += len(data)
                if self.held_bytes >= MAX_HELD:
                    self.room.clear()
                self.more.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            self.more.set()

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.held:
                    if self.eof:
                        break
                    self.more.clear()
                    await self.more.wait()
                    continue
                due, data = self.held[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.held.popleft()
                self.held_bytes -= len(data)
                if self.held_bytes < MAX_HELD:
                    self.room.set()
                self.writer.write(data)
                await self.writer.drain()
            with contextlib.suppress(OSError):
                self.writer.write_eof()
        except (ConnectionError, OSError):
            pass


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, target: str, port: int,
                delay: float) -> None:
    try:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(target, port), 10)
    except (OSError, TimeoutError):
        client_w.close()
        return
    _nodelay(client_w)
    _nodelay(up_w)
    pipes = [Pipe(client_r, up_w, delay), Pipe(up_r, client_w, delay)]
    tasks = [asyncio.create_task(coro) for p in pipes for coro in (p.pump_in(), p.pump_out())]
    # done when either side is finished in both directions, or either side broke
    await asyncio.wait(tasks, return_when=asyncio.ALL_COMPLETED)
    for w in (client_w, up_w):
        w.close()


def parse_route(text: str) -> tuple[str, int, int, str, int, float]:
    listen, _, to = text.partition("=")
    host, base, count = listen.rsplit(":", 2)
    parts = to.split(":")
    target_base = int(parts[1]) if len(parts) == 3 else int(base)
    return host, int(base), int(count), parts[0], target_base, float(parts[-1])


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _nodelay(writer)
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    writer.close()


async def main(routes: list[str], echo_port: int = 0) -> None:
    servers = []
    if echo_port:  # for measuring the proxy itself: the other namespaces reach it through their proxies
        servers.append(await asyncio.start_server(echo, "0.0.0.0", echo_port, reuse_address=True))
    for text in routes:
        host, base, count, target, target_base, delay = parse_route(text)
        for port in range(base, base + count):
            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, to: int = target_base + port - base,
                             target: str = target, delay: float = delay) -> None:
                await relay(r, w, target, to, delay)

            servers.append(await asyncio.start_server(handle, host, port, reuse_address=True))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="delayproxy")
    parser.add_argument("--route", action="append", required=True)
    parser.add_argument("--echo", type=int, default=0, help="also serve a TCP echo on 0.0.0.0:PORT")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.route, args.echo))
    sys.exit(0)
