"""Hostile HTTP and WebSocket clients against a real `cluster up` (issue 15).

Every attack here was run against the old edge first (figures in docs/SECURITY.md, "HTTP edge"):
endless header lines grew a worker by ~1.7 GB in 4 s; a WebSocket that floods pings and never
reads grew without bound and was never closed; a WebSocket client that stopped reading was "timed
out" every second but its socket never closed; invalid UTF-8 in a text frame logged a traceback;
a pipelined request before an upgrade wrote its HTTP response into the DERP stream.

Each test states the bound it proves: worker RSS growth (MiB) and time until the server hangs up,
both measured against deadlines, never against sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import time

import pytest

from relay_worker.client import DerpClient
from tests.faults.conftest import report, worker_rss_kib
from tests.support import ClusterProcess, await_until

READ_TIMEOUT = 1.0  # --http-read-timeout for the tests that wait for a deadline
HANDSHAKE_TIMEOUT = 2.0
#: what one hostile connection may add to a worker's RSS, whatever it sends
RSS_BOUND_MIB = 24
#: slack on top of a deadline before a test calls the connection "never closed"
SLACK = 5.0


# -- helpers ------------------------------------------------------------------------------------------


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it hangs up (EOF or reset); seconds it took. Fails on timeout."""
    started = time.monotonic()
    chunks: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def mib_growth(cluster: ClusterProcess, before: list[int]) -> float:
    return max(now - was for now, was in zip(worker_rss_kib(cluster), before, strict=True)) / 1024


def ws_handshake(path: str = "/derp", protocol: str = "derp", extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Protocol: {protocol}\r\n{extra}\r\n").encode()


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes(((0x80 if fin else 0) | opcode,))
    if size < 126:
        head += bytes((0x80 | size,))
    elif size < 65536:
        head += struct.pack("!BH", 0x80 | 126, size)
    else:
        head += struct.pack("!BQ", 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def read_head(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.readuntil(b"\r\n\r\n")


class Flood:
    """Writes `chunk` over and over to a non-blocking socket, never a partial chunk out of order."""

    def __init__(self, sock: socket.socket, chunk: bytes) -> None:
        self.sock = sock
        self.chunk = chunk
        self.pending = memoryview(chunk)
        self.sent = 0

    def push(self) -> bool:
        """One send; False once the socket is full (the server stopped reading us)."""
        n = self.sock.send(self.pending)
        self.sent += n
        self.pending = self.pending[n:] if n < len(self.pending) else memoryview(self.chunk)
        return True

    async def run(self, seconds: float, stop: object = None) -> None:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            try:
                self.push()
            except BlockingIOError:
                await asyncio.sleep(0.01)  # socket full: the server stopped reading us
            if stop is not None and stop():  # type: ignore[operator]
                return


def peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1 << 16, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def log_tracebacks(cluster: ClusterProcess) -> list[str]:
    return [line for line in cluster.output if "Traceback" in line or "Exception in ASGI" in line]


# -- request heads ------------------------------------------------------------------------------------


async def test_endless_header_lines_get_431_and_bounded_memory() -> None:
    """4 MiB of tiny header lines, as fast as the socket takes them. Old: no answer, and the worker
    grew ~14 MiB per MiB received (57 MiB in 4 s: +812 MiB). Bound: 431 and a hang-up after
    MAX_HEAD_BYTES (64 KiB); RSS growth under RSS_BOUND_MIB. The 4 MiB cap keeps the client from
    writing after our close (its reset would discard the 431 before it is read)."""
    with ClusterProcess(workers=1) as cluster:
        before = worker_rss_kib(cluster)
        reader, writer = await connect(cluster.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        lines = b"X-A: b\r\n" * 8192  # 64 KiB a write
        started = time.monotonic()
        sent = 0
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while sent < 4 << 20 and time.monotonic() - started < 4.0 and not reader.at_eof():
                writer.write(lines)
                await writer.drain()
                sent += len(lines)
                if reader._buffer:  # type: ignore[attr-defined]  # the answer has arrived
                    break
        answer, _ = await read_until_closed(reader, SLACK)
        closed_after = time.monotonic() - started
        growth = mib_growth(cluster, before)
        writer.close()
        report("endless header lines", sent_mib=round(sent / 2**20, 2), closed_after_s=round(closed_after, 2),
               rss_growth_mib=round(growth, 1))
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        assert growth < RSS_BOUND_MIB
        assert not log_tracebacks(cluster)


async def test_long_header_value_in_small_pieces_is_refused_at_the_line_bound() -> None:
    """One header value, 256 bytes a write (httptools concatenates each piece: quadratic).
    Bound: 431 once the line passes MAX_LINE_BYTES (8 KiB), well before MAX_HEAD_BYTES."""
    with ClusterProcess(workers=1) as cluster:
        reader, writer = await connect(cluster.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ")
        sent = 0
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(64):  # 16 KiB: past the line bound, far below the head bound
                writer.write(b"a" * 256)
                await writer.drain()
                sent += 256
                await asyncio.sleep(0)  # one write per segment, as a dribbling client sends them
        answer, _ = await read_until_closed(reader, SLACK)
        writer.close()
        report("long header value", sent_kib=sent // 1024)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


async def test_too_many_headers_in_one_write_get_431() -> None:
    with ClusterProcess(workers=1) as cluster:
        reader, writer = await connect(cluster.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n")
        answer, _ = await read_until_closed(reader, SLACK)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        # a legitimate request still works
        reader, writer = await connect(cluster.port)
        writer.write(b"GET /robots.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer, _ = await read_until_closed(reader, SLACK)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"Disallow: /\n")


# -- pipelining ---------------------------------------------------------------------------------------


async def test_pipelined_request_before_a_derp_upgrade_is_answered_first() -> None:
    """GET / then a DERP upgrade in one write: Go answers the GET, then hijacks. Old: the home page
    was written after the 101 and ServerKey, into the DERP stream."""
    with ClusterProcess(workers=1) as cluster:
        reader, writer = await connect(cluster.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
        first = await read_head(reader)
        assert first.startswith(b"HTTP/1.1 200 "), first
        length = int(next(line.split(b":")[1] for line in first.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        await reader.readexactly(length)
        second = await read_head(reader)
        assert second.startswith(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n"), second
        frame = await asyncio.wait_for(reader.readexactly(5 + 40), 5)
        assert frame[0] == 0x01 and frame[5:13] == b"DERP\xf0\x9f\x94\x91"  # ServerKey, magic
        writer.close()


async def test_pipelined_flood_without_reading_is_bounded_and_closed() -> None:
    """Thousands of pipelined requests, never reading a response. Requests are served one at a time
    (the rest waits in the socket), so memory stays bounded; the read deadline aborts the socket."""
    with ClusterProcess("--http-read-timeout", str(READ_TIMEOUT), workers=1) as cluster:
        before = worker_rss_kib(cluster)
        sock = socket.create_connection(("127.0.0.1", cluster.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        flood = Flood(sock, request * 4096)
        started = time.monotonic()
        with contextlib.suppress(OSError):
            await flood.run(2.0)
        growth = mib_growth(cluster, before)
        sent = flood.sent
        await await_until(lambda: peer_closed(sock), timeout=READ_TIMEOUT + SLACK + 30, interval=0.05,
                          what="the server to drop a pipelining client that never reads")
        closed_after = time.monotonic() - started
        sock.close()
        report("pipelined flood", sent_kib=sent // 1024, rss_growth_mib=round(growth, 1),
               closed_after_s=round(closed_after, 2))
        assert growth < RSS_BOUND_MIB


# -- deadlines ----------------------------------------------------------------------------------------


async def test_every_http_phase_has_a_deadline() -> None:
    """Incomplete head, keep-alive idle, and a drip of bare CRLFs (which begin no request)."""
    with ClusterProcess("--http-read-timeout", str(READ_TIMEOUT), workers=1) as cluster:
        head_r, head_w = await connect(cluster.port)
        head_w.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        idle_r, idle_w = await connect(cluster.port)
        idle_w.write(b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        crlf_r, crlf_w = await connect(cluster.port)

        async def drip() -> None:
            with contextlib.suppress(OSError):
                while not crlf_r.at_eof():
                    crlf_w.write(b"\r\n")
                    await crlf_w.drain()
                    await asyncio.sleep(0.2)  # the attack's pacing

        dripper = asyncio.create_task(drip())
        try:
            results = await asyncio.gather(read_until_closed(head_r, READ_TIMEOUT + SLACK),
                                           read_until_closed(idle_r, READ_TIMEOUT + SLACK),
                                           read_until_closed(crlf_r, READ_TIMEOUT + SLACK))
        finally:
            dripper.cancel()
            for w in (head_w, idle_w, crlf_w):
                w.close()
        report("http deadlines", closed_after_s=[round(t, 2) for _, t in results])
        assert results[1][0].startswith(b"HTTP/1.1 200 ")


# -- WebSocket ----------------------------------------------------------------------------------------


async def test_websocket_ping_flood_without_reading_is_bounded_and_closed() -> None:
    """Opens a WebSocket, never does the DERP handshake, floods pings and reads nothing.
    Old: RSS grew without bound and the socket was never closed. Bound: RSS growth under
    RSS_BOUND_MIB; closed by the DERP handshake deadline (or the write timeout) plus slack."""
    with ClusterProcess("--handshake-timeout", str(HANDSHAKE_TIMEOUT), workers=1) as cluster:
        before = worker_rss_kib(cluster)
        sock = socket.create_connection(("127.0.0.1", cluster.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(ws_handshake())
        sock.setblocking(False)
        flood = Flood(sock, ws_frame(0x9, b"p" * 125) * 512)
        started = time.monotonic()
        closed = False
        try:
            await flood.run(HANDSHAKE_TIMEOUT + SLACK + 10, stop=lambda: peer_closed(sock))
            closed = peer_closed(sock)
        except OSError:
            closed = True
        sent = flood.sent
        closed_after = time.monotonic() - started
        growth = mib_growth(cluster, before)
        sock.close()
        report("websocket ping flood", sent_mib=round(sent / 2**20, 2), rss_growth_mib=round(growth, 1),
               closed_after_s=round(closed_after, 2))
        assert closed, "the server never closed a ping-flooding WebSocket"
        assert growth < RSS_BOUND_MIB
        assert not log_tracebacks(cluster)


async def test_websocket_client_that_stops_reading_is_closed_once() -> None:
    """A WebSocket DERP client that stops reading while a peer sends to it. Old: "write timeout"
    logged every second, the socket (and ~2 MiB) never freed. Bound: the socket is closed within
    the 2 s write timeout plus slack, and the drop is logged once."""
    with ClusterProcess(workers=1) as cluster:
        stuck = await DerpClient.connect(cluster.url, websocket=True, timeout=10)
        sender = await DerpClient.connect(cluster.url, timeout=10)
        started = time.monotonic()

        def timeout_lines() -> list[str]:
            return [line for line in cluster.output if "write timeout" in line]

        try:
            # the stuck client never calls recv(): its buffers fill, then the server's
            payload = b"x" * 60000
            deadline = started + 60
            while not timeout_lines() and time.monotonic() < deadline:
                for _ in range(8):
                    sender.send_nowait(stuck.public_key, payload)
                await sender.flush()
                await asyncio.sleep(0.01)  # the sender's pacing
            timed_out = time.monotonic() - started
            assert timeout_lines(), "never timed out"
            await await_until(lambda: cluster.varz()["worker"]["current_connections"] <= 1, timeout=SLACK,
                              what="the stuck WebSocket connection to be released")
            released = time.monotonic() - started
            report("websocket stuck reader", write_timeout_after_s=round(timed_out, 2),
                   released_after_s=round(released, 2), timeout_log_lines=len(timeout_lines()))
            assert len(timeout_lines()) == 1, timeout_lines()
        finally:
            await sender.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stuck.close(), 2)


async def test_websocket_text_frame_closes_with_1003_and_no_traceback() -> None:
    """Go's wsconn closes a text message with 1003 (C12). Old: invalid UTF-8 logged a traceback."""
    with ClusterProcess(workers=1) as cluster:
        reader, writer = await connect(cluster.port)
        # a browser offers permessage-deflate; derper never accepts it (D10)
        writer.write(ws_handshake(extra="Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"))
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 101 ") and b"sec-websocket-protocol: derp" in head.lower()
        assert b"permessage-deflate" not in head.lower()  # D10
        writer.write(ws_frame(0x1, b"\xff\xfe not utf-8"))
        rest, _ = await read_until_closed(reader, SLACK)
        writer.close()
        close_frames = [i for i in range(len(rest) - 3) if rest[i] == 0x88]
        assert close_frames, rest
        at = close_frames[-1]
        assert struct.unpack("!H", rest[at + 2:at + 4])[0] == 1003
        assert not log_tracebacks(cluster)


async def test_websocket_silent_after_upgrade_hits_the_derp_handshake_deadline() -> None:
    with ClusterProcess("--handshake-timeout", str(HANDSHAKE_TIMEOUT), workers=1) as cluster:
        reader, writer = await connect(cluster.port)
        writer.write(ws_handshake())
        await read_head(reader)
        _, took = await read_until_closed(reader, HANDSHAKE_TIMEOUT + SLACK)
        writer.close()
        report("websocket silent handshake", closed_after_s=round(took, 2))
        assert took >= HANDSHAKE_TIMEOUT * 0.5


# -- further attacks found by attacking the edge ------------------------------------------------------


async def test_silent_tls_client_is_closed_by_the_read_deadline() -> None:
    """TCP connect to the TLS port, then no ClientHello (or half of one). Before: uvicorn's TLS
    handshake timeout of 60 s. Bound: --http-read-timeout (derper's ReadTimeout covers TLS setup)."""
    with ClusterProcess("--certmode", "selfsigned", "--hostname", "127.0.0.1",
                        "--http-read-timeout", str(READ_TIMEOUT), workers=1) as cluster:
        silent_r, silent_w = await connect(cluster.port)
        half_r, half_w = await connect(cluster.port)
        half_w.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
        results = await asyncio.gather(read_until_closed(silent_r, READ_TIMEOUT + SLACK),
                                       read_until_closed(half_r, READ_TIMEOUT + SLACK))
        for w in (silent_w, half_w):
            w.close()
        report("silent TLS", closed_after_s=[round(t, 2) for _, t in results])
        assert not log_tracebacks(cluster)


async def test_endless_request_body_is_cut_by_the_read_deadline() -> None:
    """POST / with a 1 GB Content-Length, streamed: the home page answers at once, the body keeps
    coming. Bound: the request's read deadline closes the socket; memory stays flat."""
    with ClusterProcess("--http-read-timeout", str(READ_TIMEOUT), workers=1) as cluster:
        before = worker_rss_kib(cluster)
        reader, writer = await connect(cluster.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        started = time.monotonic()
        sent = 0
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while time.monotonic() - started < READ_TIMEOUT + SLACK and not reader.at_eof():
                writer.write(b"z" * 65536)
                await writer.drain()
                sent += 65536
        closed_after = time.monotonic() - started
        growth = mib_growth(cluster, before)
        writer.close()
        report("endless body", sent_mib=round(sent / 2**20, 1), closed_after_s=round(closed_after, 2),
               rss_growth_mib=round(growth, 1))
        assert closed_after < READ_TIMEOUT + SLACK
        assert growth < RSS_BOUND_MIB


MALFORMED = [
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /derp%zz?%ff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /bootstrap-dns?q=%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: \x00\x01\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,
    b"CONNECT derp.example:443 HTTP/1.1\r\nHost: derp.example\r\n\r\n",
    b"GET http://evil.example/derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n\xff" * 1,
    b"POST /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Protocol: derp\r\n\r\n",  # no Sec-WebSocket-Key
    b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: derp\r\n\r\n",
    b"POST /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: derp\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n\x00\x00\x00",
    b"GET /debug/varz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET /debug/nope?debugkey=%ff HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("attack", ["ws-frames", "raw"])
async def test_malformed_input_closes_only_that_connection_and_never_logs_a_traceback(attack: str) -> None:
    # DERP upgrades with garbage after them wait for the DERP handshake deadline: 3 s here too
    with ClusterProcess("--http-read-timeout", "3", "--handshake-timeout", "3", workers=1) as cluster:
        bystander = await DerpClient.connect(cluster.url, timeout=10)
        try:
            payloads = list(MALFORMED)
            if attack == "ws-frames":
                payloads = [ws_handshake() + frame for frame in (
                    ws_frame(0x2, b"\x02\x00\x00\x00\x05hello"),  # a frame that is not ClientInfo
                    ws_frame(0x9, b"p" * 126),  # control frame too long: 1002
                    ws_frame(0x3, b"x"),  # reserved opcode
                    ws_frame(0x2, b"a", fin=False) + ws_frame(0x1, b"b"),  # text inside a binary message
                    bytes((0x82, 0x7f)) + b"\xff" * 8,  # unmasked, 2**64-1 bytes
                    ws_frame(0x8, b"\x03"),  # close with a 1-byte payload
                    ws_frame(0x2, b"x" * ((1 << 20) + 1)),  # over MAX_MESSAGE
                )]
            for payload in payloads:
                reader, writer = await connect(cluster.port)
                writer.write(payload)
                with contextlib.suppress(OSError):
                    await writer.drain()
                await read_until_closed(reader, 3 + SLACK)
                writer.close()
            # the bystander is still connected and relaying
            await bystander.send(bystander.public_key, b"still here")
            got = await bystander.recv_packet(timeout=5)
            assert got.data == b"still here"
            assert not log_tracebacks(cluster), "\n".join(cluster.output[-50:])
            assert not cluster.exited()
        finally:
            await bystander.close()


async def test_plain_http_port_has_the_same_bounds() -> None:
    """--http-port (derper's port 80 beside TLS) is served by the same bounded protocol, without DERP."""
    from tests.support import free_port

    http_port = free_port()
    with ClusterProcess("--certmode", "selfsigned", "--hostname", "127.0.0.1", "--http-port", str(http_port),
                        "--http-read-timeout", str(READ_TIMEOUT), workers=1) as cluster:
        before = worker_rss_kib(cluster)
        reader, writer = await connect(http_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20000)
        answer, _ = await read_until_closed(reader, SLACK)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        reader, writer = await connect(http_port)
        writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        answer, _ = await read_until_closed(reader, READ_TIMEOUT + SLACK)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 302 "), answer[:80]  # to HTTPS, never DERP on port 80
        idle_r, idle_w = await connect(http_port)
        _, took = await read_until_closed(idle_r, READ_TIMEOUT + SLACK)
        idle_w.close()
        assert mib_growth(cluster, before) < RSS_BOUND_MIB
        report("plain http port", idle_closed_after_s=round(took, 2))
