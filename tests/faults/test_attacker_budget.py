"""What one connection can cost a worker, phase by phase: the figures behind docs/SECURITY.md's
"an attacker with N connections" paragraph.

Each phase holds a connection at the most expensive point it allows, with as many connections as
the test can afford, against a fresh 1-worker node (RSS does not shrink after a free, so phases
cannot share a worker):
- a silent TCP connection (nothing sent);
- an HTTP request head one line short of its 64 KiB bound, never finished;
- a DERP upgrade that announces a 256 KiB ClientInfo and sends all but its last byte;
- an admitted client that sits idle;
- an admitted client that never reads while a sender fills its queue with 64 KiB packets.
The worker's RSS growth divided by the connection count must stay under the phase's bound, and
every connection that is not an admitted, reading client must be closed by its phase's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from relay_worker import frames as F
from relay_worker.client import DerpClient
from tests.faults.conftest import raise_nofile, report
from tests.support import ClusterProcess, RawConn, await_until, rss_kib

DEADLINE = 2.0  # --handshake-timeout and --http-read-timeout of the node under attack
UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"


async def connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def silent(port: int) -> socket.socket:
    return await connect(port)


async def head_short_of_its_bound(port: int) -> socket.socket:
    sock = await connect(port)
    lines = b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"a" * 8000) for i in range(7))  # 7 x 8 KiB lines
    await asyncio.get_running_loop().sock_sendall(sock, b"GET /derp HTTP/1.1\r\nHost: x\r\n" + lines)
    return sock


async def client_info_short_of_its_bound(port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = await connect(port)
    await loop.sock_sendall(sock, UPGRADE)
    partial = F.build_frame(F.CLIENT_INFO, b"\x00" * F.MAX_INFO_LEN)[:-1]
    await loop.sock_sendall(sock, partial)
    return sock


PHASES: dict[str, tuple[Callable[[int], Awaitable[socket.socket]], int, int]] = {
    # phase: (how to open one, connections, bound on RSS growth per connection in KiB)
    "silent_tcp": (silent, 1000, 8),
    "http_head": (head_short_of_its_bound, 300, 80),
    "client_info": (client_info_short_of_its_bound, 150, 300),
}


def closed_by_server(sock: socket.socket) -> bool:
    try:
        while True:
            if sock.recv(1 << 16, socket.MSG_DONTWAIT) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize("phase", list(PHASES))
async def test_a_connection_before_admission_costs_at_most_its_bound_until_its_deadline(phase: str) -> None:
    opener, count, bound_kib = PHASES[phase]
    raise_nofile(count + 1000)
    with ClusterProcess("--handshake-timeout", str(DEADLINE), "--http-read-timeout", str(DEADLINE),
                        workers=1) as cluster:
        worker = cluster.worker_pids()[0]
        base = rss_kib(worker)
        socks: list[socket.socket] = []
        try:
            opened_at = time.monotonic()
            for start in range(0, count, 50):
                socks += await asyncio.gather(*(opener(cluster.port) for _ in range(min(50, count - start))))
            held = rss_kib(worker) - base
            per_conn = held / count
            await await_until(lambda: all(closed_by_server(s) for s in socks), timeout=DEADLINE + 10,
                              what=f"every {phase} connection closed by its deadline")
            closed_after = time.monotonic() - opened_at
            report(f"attacker budget: {phase}", connections=count, rss_growth_kib=held,
                   per_connection_kib=round(per_conn, 1), bound_kib=bound_kib,
                   all_closed_after_s=round(closed_after, 2))
            assert per_conn <= bound_kib, (phase, per_conn)
        finally:
            for sock in socks:
                sock.close()


IDLE_CLIENTS = 400
IDLE_BOUND_KIB = 40
STALLED_CLIENTS = 12
# what a never-reader may be made to hold: its 32-packet queue of 64 KiB packets plus a transport
# write in flight, before the 2 s write timeout cuts it off
STALLED_BOUND_KIB = 32 * 64 + 512


async def test_admitted_clients_cost_their_bound_idle_or_stalled() -> None:
    raise_nofile(IDLE_CLIENTS + 1000)
    with ClusterProcess("--handshake-timeout", str(DEADLINE), workers=1) as cluster:
        worker = cluster.worker_pids()[0]
        base = rss_kib(worker)
        idle: list[RawConn] = []
        stalled: list[RawConn] = []
        sender = await DerpClient.connect(cluster.url)
        try:
            for _ in range(IDLE_CLIENTS // 20):
                idle += await asyncio.gather(*(RawConn.open(cluster.port) for _ in range(20)))
            idle_kib = (rss_kib(worker) - base) / IDLE_CLIENTS

            stalled = [await RawConn.open(cluster.port, rcvbuf=4096) for _ in range(STALLED_CLIENTS)]
            before_flood = rss_kib(worker)
            packet = b"\x01" * F.MAX_PACKET_SIZE
            peak = before_flood
            for _ in range(48):  # more than the queue holds, for each never-reader
                for conn in stalled:
                    sender.send_nowait(conn.public, packet)
                await sender.flush()
                peak = max(peak, rss_kib(worker))
            stalled_kib = (peak - before_flood) / STALLED_CLIENTS
            await await_until(lambda: cluster.varz()["worker"]["write_timeouts"] >= STALLED_CLIENTS,
                              timeout=15, what="the never-readers cut off by the write timeout")
            report("attacker budget: admitted", idle_clients=IDLE_CLIENTS, idle_per_client_kib=round(idle_kib, 1),
                   stalled_clients=STALLED_CLIENTS, stalled_per_client_kib=round(stalled_kib, 1),
                   drops=cluster.varz()["worker"]["drops"])
            assert idle_kib <= IDLE_BOUND_KIB, idle_kib
            assert stalled_kib <= STALLED_BOUND_KIB, stalled_kib
        finally:
            with contextlib.suppress(Exception):
                await sender.close()
            for conn in [*idle, *stalled]:
                conn.close()
