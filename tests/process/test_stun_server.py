"""The STUN server over real UDP sockets on loopback, checked by independent clients and by ours."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import stun.server as stun_server_module
from stun import (
    DropReason,
    StunError,
    StunServer,
    build_binding_request,
    build_binding_response,
    classify_request,
    start_stun_server,
    stun_request,
)
from stun.codec import MAGIC_COOKIE, BindingRequest

REPO = Path(__file__).resolve().parents[2]
NO_ANSWER_WAIT = 0.3  # how long "no answer" is waited for; loopback answers arrive in well under 1 ms


def _ipv6_loopback_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = [
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param(
        "::1",
        id="ipv6",
        marks=pytest.mark.skipif(not _ipv6_loopback_usable(), reason="no IPv6 loopback on this host"),
    ),
]


class UdpPeer(asyncio.DatagramProtocol):
    """A test client socket: send raw datagrams, await the next one with a deadline."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.inbox.put_nowait(data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    @property
    def local(self) -> tuple[str, int]:
        assert self.transport is not None
        name = self.transport.get_extra_info("sockname")
        return name[0], name[1]

    async def recv(self, timeout: float = 2.0) -> bytes | None:
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return None


@contextlib.asynccontextmanager
async def udp_peer(addr: tuple[str, int]) -> AsyncIterator[UdpPeer]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(UdpPeer, remote_addr=addr)
    try:
        yield peer
    finally:
        transport.close()


@pytest.fixture(params=FAMILIES)
async def server(request: pytest.FixtureRequest) -> AsyncIterator[StunServer]:
    srv = await start_stun_server(request.param, 0)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def seen_by_server(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record the source address of every datagram the server answers, by wrapping the codec call.

    Clients we do not control (a subprocess) pick their own ephemeral port; this is how a test learns
    it and can check the mapped address the client reports.
    """
    seen: list[tuple[str, int]] = []
    real = stun_server_module.respond

    def recording(data: bytes, ip: str, port: int, **kw: Any) -> bytes | DropReason:
        out = real(data, ip, port, **kw)
        if isinstance(out, bytes):
            seen.append((ip, port))
        return out

    monkeypatch.setattr(stun_server_module, "respond", recording)
    return seen


# --- independent client 1: aioice's STUN message code --------------------------------------------


@pytest.mark.parametrize("fingerprint", [False, True], ids=["plain", "software+fingerprint"])
async def test_aioice_client_gets_its_address(server: StunServer, fingerprint: bool) -> None:
    aioice_stun = pytest.importorskip("aioice.stun", reason="aioice not installed (pip install aioice)")
    request = aioice_stun.Message(message_method=aioice_stun.Method.BINDING, message_class=aioice_stun.Class.REQUEST)
    if fingerprint:
        request.attributes["SOFTWARE"] = "aioice-test"
        request.add_fingerprint()
    async with udp_peer(server.address) as peer:
        peer.send(bytes(request))
        data = await peer.recv()
        assert data is not None, "no answer to aioice's Binding request"
        response = aioice_stun.parse_message(data)
        assert response.message_method == aioice_stun.Method.BINDING
        assert response.message_class == aioice_stun.Class.RESPONSE
        assert response.transaction_id == request.transaction_id
        assert response.attributes["XOR-MAPPED-ADDRESS"] == peer.local
        assert response.attributes["MAPPED-ADDRESS"] == peer.local
    assert server.stats() == {"requests": 1, "responses": 1, "drops": {}}


# --- independent client 2: coturn's turnutils_stunclient -----------------------------------------

STUNCLIENT = shutil.which("turnutils_stunclient")
REFLEXIVE = re.compile(r"UDP reflexive addr: (\S+):(\d+)")


@pytest.mark.skipif(
    STUNCLIENT is None,
    reason="turnutils_stunclient not found (Debian package coturn; .ci/run installs it)",
)
async def test_coturn_stunclient_gets_its_address(server: StunServer, seen_by_server: list[tuple[str, int]]) -> None:
    host, port = server.address
    assert STUNCLIENT is not None
    # The client waits forever when nobody answers, so it is given a deadline and killed after it.
    proc = await asyncio.create_subprocess_exec(
        STUNCLIENT,
        "-p",
        str(port),
        host,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("turnutils_stunclient got no answer within 10 s")
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    match = REFLEXIVE.search(text)
    assert match is not None, f"no reflexive address in output: {text!r}"
    reported = (match.group(1), int(match.group(2)))
    assert seen_by_server, "server answered nothing"
    assert reported == seen_by_server[-1]
    assert reported[0] == host


# --- what gets no answer -------------------------------------------------------------------------

TXID = bytes(range(12))


def _header(msg_type: int, length: int, cookie: int = MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI12s", msg_type, length, cookie, TXID)


BAD_DATAGRAMS: list[tuple[str, bytes, str]] = [
    ("garbage", b"\xc3" + bytes(range(47)), "not_stun"),
    ("tls_record_like", b"\x16\x03\x01\x00\x40" + bytes(59), "bad_cookie"),
    ("truncated_header", build_binding_request(TXID)[:12], "too_short"),
    ("truncated_body", build_binding_request(TXID, software="tailnode", add_fingerprint=True)[:32], "truncated"),
    ("wrong_cookie", _header(0x0001, 0, cookie=0xDEADBEEF), "bad_cookie"),
    (
        "binding_success_response",
        build_binding_response(BindingRequest(TXID, 20), "127.0.0.1", 9),
        "not_binding_request",
    ),
    (
        "attribute_overruns_message",
        _header(0x0001, 8) + struct.pack("!HH", 0x8022, 200) + b"abcd",
        "malformed_attributes",
    ),
    ("change_request", _header(0x0001, 8) + struct.pack("!HHI", 0x0003, 4, 6), "unknown_required_attribute"),
]


def test_bad_datagram_table_matches_codec() -> None:
    for _name, data, reason in BAD_DATAGRAMS:
        assert classify_request(data) == reason


async def test_bad_datagrams_get_no_answer_and_are_counted(server: StunServer) -> None:
    async with udp_peer(server.address) as peer:
        for name, data, _reason in BAD_DATAGRAMS:
            peer.send(data)
            assert await peer.recv(NO_ANSWER_WAIT) is None, f"server answered {name}"
        expected: dict[str, int] = {}
        for _name, _data, reason in BAD_DATAGRAMS:
            expected[reason] = expected.get(reason, 0) + 1
        assert server.stats() == {"requests": len(BAD_DATAGRAMS), "responses": 0, "drops": expected}

        # Still alive and answering after all that.
        good = build_binding_request()
        peer.send(good)
        answer = await peer.recv()
        assert answer is not None
        assert answer[8:20] == good[8:20]
    stats = server.stats()
    assert stats["responses"] == 1
    assert stats["requests"] == stats["responses"] + sum(stats["drops"].values())


async def test_handler_exception_does_not_kill_server(server: StunServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real = stun_server_module.respond
    poison = b"\x00\x01\x00\x00POISON-PILL!!!!!"

    def flaky(data: bytes, ip: str, port: int, **kw: Any) -> bytes | DropReason:
        if data == poison:
            raise RuntimeError("simulated handler bug")
        return real(data, ip, port, **kw)

    monkeypatch.setattr(stun_server_module, "respond", flaky)
    async with udp_peer(server.address) as peer:
        peer.send(poison)
        assert await peer.recv(NO_ANSWER_WAIT) is None
        good = build_binding_request()
        peer.send(good)
        answer = await peer.recv()
        assert answer is not None and answer[8:20] == good[8:20]
    assert server.stats() == {"requests": 2, "responses": 1, "drops": {"internal_error": 1}}


# --- our client ----------------------------------------------------------------------------------


async def test_our_client_against_our_server(server: StunServer, seen_by_server: list[tuple[str, int]]) -> None:
    host, port = server.address
    result = await stun_request(host, port, timeout=2.0, retries=0)
    assert (result.ip, result.port) == seen_by_server[-1]
    assert result.ip == host
    assert 0 < result.rtt < 2.0
    ip, mapped_port, rtt = result  # a tuple, so it unpacks
    assert (ip, mapped_port, rtt) == (result.ip, result.port, result.rtt)


def _free_udp_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("host", FAMILIES)
async def test_client_fails_fast_when_nothing_listens(host: str) -> None:
    port = _free_udp_port(host)
    started = time.monotonic()
    with pytest.raises(StunError):
        await stun_request(host, port, timeout=0.5, retries=1)
    assert time.monotonic() - started < 1.5  # ICMP refusal, or at worst the 2 x 0.5 s budget


class _Silent(asyncio.DatagramProtocol):
    """Reads and never answers: no ICMP error, so the client must run out its own timeout."""


class _WrongTxid(asyncio.DatagramProtocol):
    """Answers every request correctly except for the transaction id."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.transport.sendto(build_binding_response(BindingRequest(b"\xee" * 12, 20), addr[0], addr[1]), addr)


@pytest.mark.parametrize(
    ("factory", "message"),
    [(_Silent, "no response"), (_WrongTxid, "transaction id")],
    ids=["silent", "wrong_txid"],
)
async def test_client_raises_after_bounded_time(factory: Callable[[], asyncio.DatagramProtocol], message: str) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(factory, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        started = time.monotonic()
        with pytest.raises(StunError, match=message):
            await stun_request("127.0.0.1", port, timeout=0.2, retries=1)
        elapsed = time.monotonic() - started
        assert 0.35 < elapsed < 1.5  # two attempts of 0.2 s each
    finally:
        transport.close()


async def test_two_servers_share_a_port_with_reuse_port() -> None:
    first = await start_stun_server("127.0.0.1", 0)
    try:
        second = await start_stun_server("127.0.0.1", first.address[1])
        second.close()
    finally:
        first.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        with pytest.raises(OSError):
            await start_stun_server("127.0.0.1", taken, reuse_port=False)


# --- the command line ----------------------------------------------------------------------------


async def _start_cli(*args: str) -> tuple[asyncio.subprocess.Process, tuple[str, int]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stun", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
    match = re.fullmatch(r"stun listening on \[?([^\]]+)\]?:(\d+)\n", line)
    assert match is not None, line
    return proc, (match.group(1), int(match.group(2)))


async def test_cli_server_answers_and_bench_runs() -> None:
    proc, addr = await _start_cli("--listen", "127.0.0.1:0")
    try:
        result = await stun_request(*addr, timeout=2.0, retries=1)
        assert result.ip == "127.0.0.1"
        bench = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "stun",
            "--bench",
            f"{addr[0]}:{addr[1]}",
            "--seconds",
            "0.5",
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(bench.communicate(), 30)
        assert bench.returncode == 0
        figures = json.loads(out)
        assert figures["answered"] > 0
        assert figures["requests_per_second"] > 0
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    final = json.loads(err.decode().strip().splitlines()[-1])
    assert final["responses"] >= 1


async def test_cli_bench_refuses_non_loopback_target() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stun",
        "--bench",
        "192.0.2.1:3478",
        "--seconds",
        "1",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode != 0
    assert b"loopback" in err
