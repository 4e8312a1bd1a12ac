"""Connections that hold server resources without ever becoming clients: 5,000 half-open TCP
connections, 50 slow-loris HTTP requests (one header byte a second), and DERP upgrades that never
send ClientInfo. Legitimate clients must keep connecting and relaying throughout; silent DERP
handshakes must be closed by the handshake timeout (`--handshake-timeout 1` keeps the test short).

Whether idle and slow-loris HTTP connections are closed at all is a separate test: uvicorn arms its
keep-alive timer only after a first response, so the worker's HTTP protocol gives the request phase
its own deadline, --http-read-timeout (a regression test for a bug the fault suite found; see
docs/FAULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from relay_worker.client import DerpClient, DerpClientError
from tests.faults.conftest import open_fds, raise_nofile, report, worker_rss_kib
from tests.support import ClusterProcess, await_until

HALF_OPEN = 5000
SLOW_LORIS = 50
SILENT_HANDSHAKES = 100
HANDSHAKE_TIMEOUT = 1.0
ATTACK_SECONDS = 8.0
#: a legitimate connect + handshake + one relayed packet must finish within this, under attack
LEGIT_BOUND = 2.0
LORIS_REQUEST = b"GET /derp HTTP/1.1\r\nHost: derp.example\r\nUser-Agent: loris\r\nX-Padding: " + b"a" * 200


async def open_half_open(port: int, count: int) -> list[socket.socket]:
    """TCP connections that complete the three-way handshake and then never send a byte."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    async def one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        socks.append(sock)
        await loop.sock_connect(sock, ("127.0.0.1", port))

    for start in range(0, count, 500):
        await asyncio.gather(*(one() for _ in range(min(500, count - start))))
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


async def slow_loris(port: int, stop: asyncio.Event, tasks: set[asyncio.Task[None]]) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))

    async def drip() -> None:
        for byte in LORIS_REQUEST:
            if stop.is_set() or closed_by_server(sock):
                return
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, bytes((byte,)))
            await asyncio.sleep(1.0)  # the attack's pacing: one header byte a second

    task = asyncio.create_task(drip())
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return sock


async def silent_handshake(port: int) -> float:
    """Upgrade to DERP, read ServerKey, never send ClientInfo; seconds until the server hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n")
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT + 10):
            while await reader.read(4096):
                pass
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


async def legit_round(url: str) -> float:
    started = time.monotonic()
    a = await DerpClient.connect(url, timeout=LEGIT_BOUND + 3)
    b = await DerpClient.connect(url, timeout=LEGIT_BOUND + 3)
    try:
        # a and b may sit on different workers: until b's key has reached a's worker by gossip
        # (milliseconds) a packet is dropped as unknown_dest, so send again, as real clients do
        deadline = started + LEGIT_BOUND + 3
        while True:
            await a.send(b.public_key, b"legit")
            try:
                got = await b.recv_packet(timeout=0.1)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        assert got.src == a.public_key and got.data == b"legit"
    finally:
        await a.close()
        await b.close()
    return time.monotonic() - started


async def test_half_open_slow_loris_and_silent_handshakes_do_not_lock_out_clients() -> None:
    limit = raise_nofile(HALF_OPEN + 2000)
    if limit < HALF_OPEN + 500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {limit} is too low for {HALF_OPEN} half-open connections")
    with ClusterProcess("--handshake-timeout", str(HANDSHAKE_TIMEOUT), workers=2) as cluster:
        pids = cluster.worker_pids()
        worker_limits = [_soft_nofile(pid) for pid in pids]
        fds_before = [open_fds(pid) for pid in pids]
        rss_before = worker_rss_kib(cluster)
        stop = asyncio.Event()
        drips: set[asyncio.Task[None]] = set()
        half_open: list[socket.socket] = []
        loris: list[socket.socket] = []
        try:
            half_open = await open_half_open(cluster.port, HALF_OPEN)
            loris = [await slow_loris(cluster.port, stop, drips) for _ in range(SLOW_LORIS)]
            await await_until(lambda: sum(open_fds(pid) for pid in pids) >= sum(fds_before) + HALF_OPEN,
                              timeout=10, what="the workers to accept every half-open connection")
            silent = asyncio.gather(*(silent_handshake(cluster.port) for _ in range(SILENT_HANDSHAKES)))
            legit: list[float] = []
            started = time.monotonic()
            while time.monotonic() - started < ATTACK_SECONDS:
                legit.append(await legit_round(cluster.url))
                await asyncio.sleep(0.25)  # pacing of the legitimate clients
            silent_closed = await silent
            fds_peak = [open_fds(pid) for pid in pids]
            rss_peak = worker_rss_kib(cluster)
            still_open_half = sum(not closed_by_server(s) for s in half_open)
            still_open_loris = sum(not closed_by_server(s) for s in loris)
            timeouts = cluster.total("handshake_timeouts")
            report("half-open / slow-loris / silent handshakes", half_open=HALF_OPEN, slow_loris=SLOW_LORIS,
                   silent_handshakes=SILENT_HANDSHAKES, worker_nofile_soft=worker_limits,
                   worker_fds_before=fds_before, worker_fds_under_attack=fds_peak,
                   rss_before_kib=rss_before, rss_under_attack_kib=rss_peak,
                   legit_rounds=len(legit), legit_max_s=round(max(legit), 3),
                   silent_closed_after_max_s=round(max(silent_closed), 2), handshake_timeouts=timeouts,
                   half_open_still_open_after_s={round(ATTACK_SECONDS + 2): still_open_half},
                   slow_loris_still_open=still_open_loris)
            assert max(legit) <= LEGIT_BOUND, f"a legitimate client took {max(legit):.2f}s"
            assert max(silent_closed) <= HANDSHAKE_TIMEOUT + 2.0, "silent handshakes must hit the timeout"
            assert timeouts >= SILENT_HANDSHAKES
            assert all(pid in cluster.worker_pids() for pid in pids), "a worker died under the attack"
        finally:
            stop.set()
            await asyncio.gather(*drips, return_exceptions=True)
            for sock in [*half_open, *loris]:
                sock.close()


def _soft_nofile(pid: int) -> int:
    for line in open(f"/proc/{pid}/limits").read().splitlines():  # noqa: SIM115 - tiny procfs read
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return 0


async def test_idle_and_slow_loris_http_connections_are_closed() -> None:
    # Expectation: the request phase has its own deadline (--http-read-timeout, derper's 30 s
    # ReadTimeout by default; 1 s here); 4 s of slack on top.
    with ClusterProcess("--http-read-timeout", str(HANDSHAKE_TIMEOUT), workers=1) as cluster:
        stop = asyncio.Event()
        drips: set[asyncio.Task[None]] = set()
        idle = await open_half_open(cluster.port, 20)
        loris = [await slow_loris(cluster.port, stop, drips) for _ in range(5)]
        try:
            await await_until(lambda: all(closed_by_server(s) for s in [*idle, *loris]),
                              timeout=HANDSHAKE_TIMEOUT + 4, interval=0.1,
                              what="the server to close idle and slow-loris HTTP connections")
        finally:
            stop.set()
            await asyncio.gather(*drips, return_exceptions=True)
            for sock in [*idle, *loris]:
                sock.close()


async def test_claiming_to_be_a_prober_does_not_bypass_the_client_limit() -> None:
    with ClusterProcess("--max-clients", "2", workers=1) as cluster:
        regular = [await DerpClient.connect(cluster.url) for _ in range(2)]
        sneaky: list[DerpClient] = []
        try:
            with pytest.raises(DerpClientError):
                # any unauthenticated client can set IsProber: it must be refused like any other
                sneaky.append(await DerpClient.connect(cluster.url, is_prober=True, timeout=5))
        finally:
            for client in [*regular, *sneaky]:
                await client.close()


FLOOD_CONNECTS = 400
PER_IP_LIMIT = 20


async def _refused_quickly(port: int) -> tuple[bool, float]:
    """Connect from 127.0.0.1 and try the DERP upgrade; (refused?, seconds until we knew)."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True, time.monotonic() - started
    try:
        writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
        head = await asyncio.wait_for(reader.read(12), 5)
        return head == b"", time.monotonic() - started
    except (OSError, TimeoutError):
        return True, time.monotonic() - started
    finally:
        writer.close()


async def test_connect_flood_from_one_source_beyond_the_accept_limit_is_refused_quickly() -> None:
    """A flood of connects from one source past the per-source accept limit: the excess is aborted
    before any HTTP is parsed, within a fraction of a second, and counted; a client from another
    source address (127.0.0.2) is served throughout."""
    with ClusterProcess("--accept-connection-limit-per-ip", str(PER_IP_LIMIT), workers=1) as cluster:
        flood = asyncio.gather(*(_refused_quickly(cluster.port) for _ in range(FLOOD_CONNECTS)))
        # the legitimate client comes from another loopback source address while the flood runs
        legit_started = time.monotonic()
        a = await DerpClient.connect(cluster.url, local_addr=("127.0.0.3", 0))
        results = await flood
        refused = [took for was_refused, took in results if was_refused]
        stats = cluster.varz()["accept_limit"]
        report("connect flood", refused=len(refused), of=FLOOD_CONNECTS,
               slowest_refusal_s=round(max(refused), 3) if refused else None, limiter=stats)
        assert len(refused) >= FLOOD_CONNECTS - 3 * PER_IP_LIMIT, "the flood was not held to the limit"
        assert max(refused) < 1.0, "refusals must be quick"
        assert stats["refused_per_ip"] >= len(refused) - 5
        # a client from 127.0.0.2 is not affected by 127.0.0.1's empty bucket
        b = await DerpClient.connect(cluster.url, local_addr=("127.0.0.2", 0))
        try:
            await b.send(a.public_key, b"served during the flood")
            got = await a.recv_packet(timeout=5)
            assert got.data == b"served during the flood"
            assert time.monotonic() - legit_started < 30
        finally:
            await a.close()
            await b.close()
