"""Admission and abuse control, against real servers started in the test.

The relay runs in-process on a real loopback socket (uvicorn + the DERP upgrade, exactly the worker's
stack) with an `AdmissionPolicy` hooked in. The verifiers it talks to are stand-ins started here: a
unix-socket HTTP server playing tailscaled's LocalAPI (an external system we do not own) and an HTTP
server on 127.0.0.1 playing an admission URL such as headscale's /verify.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from relay_worker import frames as F
from relay_worker.admission import AdmissionPolicy, install, parse_allow_keys, source_ip
from relay_worker.client import DerpClient, DerpClientError, RecvPacket
from relay_worker.handshake import ClientInfo, seal_client_info
from relay_worker.http_app import build_app
from relay_worker.keys import PrivateKey
from relay_worker.ratelimit import AcceptLimiter, TokenBucket, read_limit_stats
from relay_worker.relay import Relay
from relay_worker.server import WorkerServer, make_listen_socket, serve, uvicorn_config
from tests.support import await_until, free_port

MESH_KEY = "5e" * 32


# -- stand-ins for the external verifiers -------------------------------------------------------------


@dataclass
class SeenRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


async def _read_request(reader: asyncio.StreamReader) -> SeenRequest:
    head = await reader.readuntil(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return SeenRequest(method, target, headers, body)


def _response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 500: "Internal Server Error",
              503: "Service Unavailable"}.get(status, "Whatever")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


@dataclass
class FakeLocalAPI:
    """tailscaled's LocalAPI as derper uses it: whois by node key over a unix socket.

    Like tailscaled it answers 403 to a Host other than local-tailscaled.sock, 404 "no match" for an
    unknown key, and a JSON WhoIsResponse for a known one.
    """

    path: Path
    known: set[bytes] = field(default_factory=set)
    delay: float = 0.0
    status_override: int = 0
    body_override: bytes | None = None
    requests: list[SeenRequest] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None

    async def start(self) -> FakeLocalAPI:
        self.server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await _read_request(reader)
            self.requests.append(request)
            if self.delay:
                await asyncio.sleep(self.delay)
            writer.write(self._answer(request))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _answer(self, request: SeenRequest) -> bytes:
        if request.headers.get("host") != "local-tailscaled.sock":
            return _response(403, b"invalid localapi request\n", "text/plain")
        if self.status_override:
            return _response(self.status_override, b"something broke\n", "text/plain")
        parts = urlsplit(request.target)
        if parts.path != "/localapi/v0/whois":
            return _response(404, b"404 page not found\n", "text/plain")
        addr = parse_qs(parts.query).get("addr", [""])[0]
        if not addr.startswith("nodekey:"):
            return _response(400, b"invalid 'addr' parameter\n", "text/plain")
        if bytes.fromhex(addr[8:]) not in self.known:
            return _response(404, b"no match for IP:port\n", "text/plain")
        if self.body_override is not None:
            return _response(200, self.body_override)
        doc = {"Node": {"ID": 1, "Key": addr, "Name": "n.example.ts.net."},
               "UserProfile": {"ID": 2, "LoginName": "a@example.com"}, "CapMap": {"x": [json.dumps("y" * 40)] * 200}}
        return _response(200, json.dumps(doc, indent="\t").encode())


@dataclass
class FakeVerifyURL:
    """An admission controller on 127.0.0.1 (headscale's /verify shape).

    `answers` maps a node key to (status, body, delay); keys not listed get `default`.
    `answered` collects the keys whose answer has been written.
    """

    default: tuple[int, bytes, float] = (200, b'{"Allow":true}', 0.0)
    answers: dict[bytes, tuple[int, bytes, float]] = field(default_factory=dict)
    requests: list[SeenRequest] = field(default_factory=list)
    received: dict[bytes, asyncio.Event] = field(default_factory=dict)
    answered: set[bytes] = field(default_factory=set)
    server: asyncio.AbstractServer | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/verify"

    async def start(self) -> FakeVerifyURL:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    def event(self, key: bytes) -> asyncio.Event:
        return self.received.setdefault(key, asyncio.Event())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await _read_request(reader)
            self.requests.append(request)
            key = bytes.fromhex(json.loads(request.body)["NodePublic"].removeprefix("nodekey:"))
            self.event(key).set()
            status, body, delay = self.answers.get(key, self.default)
            if delay:
                await asyncio.sleep(delay)
            if status < 0:
                await asyncio.sleep(3600)  # never answer
            writer.write(_response(status, body))
            await writer.drain()
            self.answered.add(key)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


# -- an in-process worker on a real loopback socket ---------------------------------------------------


@dataclass
class LocalRelay:
    relay: Relay
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"


@contextlib.asynccontextmanager
async def running_relay(relay: Relay, *, accept_gate: Any = None, admin_token: str = "") -> AsyncIterator[LocalRelay]:
    sock = make_listen_socket("127.0.0.1", 0, reuse_port=False)
    port = sock.getsockname()[1]
    app = build_app(relay, admin_token=admin_token)
    server = WorkerServer(uvicorn_config(app, relay, log_level="warning", accept_gate=accept_gate), relay,
                          drain_timeout=1.0)
    task = asyncio.create_task(serve(server, [sock]))
    try:
        await await_until(lambda: server.started or task.done(), timeout=10, what="in-process worker to start")
        if task.done():
            task.result()
        yield LocalRelay(relay, port)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


def new_relay(**kwargs: Any) -> Relay:
    kwargs.setdefault("handshake_timeout", 15.0)
    return Relay(PrivateKey.generate(), **kwargs)


@contextlib.asynccontextmanager
async def clients(*coros: Awaitable[DerpClient]) -> AsyncIterator[list[DerpClient]]:
    opened = [await coro for coro in coros]
    try:
        yield opened
    finally:
        for client in opened:
            await client.close()


async def round_trip(a: DerpClient, b: DerpClient, data: bytes, timeout: float = 5.0) -> None:
    """a -> b, b echoes -> a."""
    await a.send(b.public_key, data)
    got = await b.recv_packet(timeout)
    assert got == RecvPacket(a.public_key, data)
    await b.send(a.public_key, got.data)
    back = await a.recv_packet(timeout)
    assert back == RecvPacket(b.public_key, data)


async def connect_expect_refused(url: str, key: PrivateKey | None = None, **kwargs: Any) -> None:
    with pytest.raises(DerpClientError, match="closed"):
        await DerpClient.connect(url, key, **kwargs)


async def handshake_with_early_packet(port: int, key: PrivateKey, dst: bytes, payload: bytes,
                                      timeout: float = 10.0) -> list[tuple[int, bytes]]:
    """Fast-start upgrade, then ClientInfo and a SendPacket in one write (the packet arrives while the
    server is still deciding). Returns every frame the server sent before it closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /derp HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
                     b"Derp-Fast-Start: 1\r\n\r\n")
        parser = F.FrameParser(F.MAX_FRAME_LEN)
        frames: list[tuple[int, bytes]] = []
        async with asyncio.timeout(timeout):
            while not frames:
                data = await reader.read(65536)
                assert data, "server closed before ServerKey"
                frames += parser.feed(data)
            assert frames[0][0] == F.SERVER_KEY
            server_public = F.parse_server_key(frames[0][1])
            writer.write(seal_client_info(key, server_public, ClientInfo()) + F.build_send_packet(dst, payload))
            while True:
                try:
                    data = await reader.read(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                frames += parser.feed(data)
        return frames
    finally:
        writer.close()


@pytest.fixture
def tmp_sock_dir() -> Any:
    # unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer than that
    import tempfile

    with tempfile.TemporaryDirectory(prefix="adm-") as name:
        yield Path(name)


# -- tailscaled LocalAPI ----------------------------------------------------------------------------------


async def test_localapi_admits_known_and_refuses_unknown_before_any_packet_is_relayed(tmp_sock_dir: Path) -> None:
    a_key, b_key, stranger = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    api = await FakeLocalAPI(tmp_sock_dir / "tailscaled.sock", {a_key.public().raw, b_key.public().raw}).start()
    relay = new_relay()
    policy = AdmissionPolicy(verify_clients=True, tailscaled_socket=str(api.path), timeout=5)
    relay.admission = policy
    try:
        async with running_relay(relay) as worker, clients(
            DerpClient.connect(worker.url, a_key), DerpClient.connect(worker.url, b_key)
        ) as (a, b):
            await round_trip(a, b, b"members relay")
            frames = await handshake_with_early_packet(worker.port, stranger, b.public_key, b"smuggled")
            assert [t for t, _ in frames] == [F.SERVER_KEY], "a refused client gets no ServerInfo and no frames"
            # b's stream is ordered: had the stranger's early packet been relayed it would come first.
            await a.send(b.public_key, b"marker")
            assert await b.recv_packet(5) == RecvPacket(a.public_key, b"marker")
            assert relay.stats.refused_clients == 1
            assert stranger.public().raw not in relay.clients
        stats = policy.stats()
        assert stats["admitted"] == 2 and stats["refused"] == 1
        assert stats["refused_by_reason"] == {"not_in_tailnet": 1}
        # the request shape Tailscale's LocalAPI client uses (client/local WhoIsNodeKey)
        seen = api.requests[0]
        assert seen.method == "GET"
        assert seen.target == "/localapi/v0/whois?addr=nodekey%3A" + a_key.public().raw.hex()
        assert seen.headers["host"] == "local-tailscaled.sock"
        assert seen.headers["tailscale-cap"].isdigit()
        assert "referer" not in seen.headers and "origin" not in seen.headers  # tailscaled refuses those
    finally:
        await api.close()


async def test_localapi_socket_missing_fails_closed_with_clear_log(tmp_sock_dir: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_sock_dir / "nope" / "tailscaled.sock"
    relay = new_relay()
    relay.admission = policy = AdmissionPolicy(verify_clients=True, tailscaled_socket=str(missing))
    key = PrivateKey.generate()
    caplog.set_level(logging.WARNING, logger="relay_worker")
    async with running_relay(relay) as worker:
        await connect_expect_refused(worker.url, key)
    line = f"tailscaled LocalAPI socket {missing} missing: refusing nodekey:{key.public().raw.hex()}"
    assert line in caplog.text
    assert policy.stats()["verifier_errors"]["localapi"] == 1
    assert policy.stats()["refused_by_reason"] == {"localapi_error": 1}


@pytest.mark.parametrize("status", [500, 403])
async def test_localapi_errors_fail_closed(tmp_sock_dir: Path, status: int, caplog: pytest.LogCaptureFixture) -> None:
    key = PrivateKey.generate()
    api = await FakeLocalAPI(tmp_sock_dir / "ts.sock", {key.public().raw}, status_override=status).start()
    relay = new_relay()
    relay.admission = AdmissionPolicy(verify_clients=True, tailscaled_socket=str(api.path))
    caplog.set_level(logging.WARNING, logger="relay_worker")
    try:
        async with running_relay(relay) as worker:
            await connect_expect_refused(worker.url, key)
    finally:
        await api.close()
    assert f"answered {status}" in caplog.text or f"({status}" in caplog.text


async def test_localapi_timeout_fails_closed(tmp_sock_dir: Path) -> None:
    key = PrivateKey.generate()
    api = await FakeLocalAPI(tmp_sock_dir / "ts.sock", {key.public().raw}, delay=30).start()
    policy = AdmissionPolicy(verify_clients=True, tailscaled_socket=str(api.path), timeout=0.5)
    try:
        started = time.monotonic()
        decision = await policy.decide(key.public().raw)
        assert not decision.allowed and "did not answer within 0.5s" in decision.reason
        assert time.monotonic() - started < 5
    finally:
        await api.close()


async def test_mesh_peer_skips_admission(tmp_sock_dir: Path) -> None:
    relay = new_relay(mesh_key=MESH_KEY)
    relay.admission = policy = AdmissionPolicy(verify_clients=True, tailscaled_socket=str(tmp_sock_dir / "none"))
    async with running_relay(relay) as worker:
        peer = await DerpClient.connect(worker.url, mesh_key=MESH_KEY)
        await peer.close()
        await connect_expect_refused(worker.url)
    assert policy.stats()["refused"] == 1 and policy.stats()["admitted"] == 0


# -- verify URL --------------------------------------------------------------------------------------------


URL_CASES = {
    # name: (answer status, body, delay; -1 = never answers), fail_open, expect admitted
    "allow": ((200, b'{"Allow":true}', 0.0), False, True),
    "deny": ((200, b'{"Allow":false}', 0.0), True, False),
    "allow_not_true": ((200, b'{"Allow":"yes"}', 0.0), True, False),
    # derper (B2): any non-200 status is a refusal, fail-open or not; headscale answers 500 on errors
    "500_refuses_even_fail_open": ((500, b"oops", 0.0), True, False),
    "503_refuses_even_fail_open": ((503, b"", 0.0), True, False),
    "500_fail_closed": ((500, b"oops", 0.0), False, False),
    # Go's decoder (D9): field names case-insensitive, first value only, last duplicate wins
    "lowercase_allow": ((200, b'{"allow":true}', 0.0), False, True),
    "uppercase_allow": ((200, b'{"ALLOW":true}', 0.0), False, True),
    "trailing_data_ignored": ((200, b' \n{"Allow":true}\n{"Allow":false} garbage', 0.0), False, True),
    "last_duplicate_wins": ((200, b'{"Allow":true,"allow":false}', 0.0), True, False),
    "null_allow_refuses": ((200, b'{"Allow":null}', 0.0), True, False),
    "empty_body_refuses_even_fail_open": ((200, b"", 0.0), True, False),
    "not_json_refuses_even_fail_open": ((200, b"<html>ok</html>", 0.0), True, False),
    "array_refuses": ((200, b"[true]", 0.0), True, False),
    "allow_beyond_4k_refuses": ((200, b'{"pad":"' + b"x" * 5000 + b'","Allow":true}', 0.0), True, False),
    "timeout_fail_open": ((-1, b"", 0.0), True, True),
    "timeout_fail_closed": ((-1, b"", 0.0), False, False),
    "4xx_refuses_even_fail_open": ((404, b"not here", 0.0), True, False),
}


@pytest.mark.parametrize("case", sorted(URL_CASES))
async def test_verify_url_modes(case: str) -> None:
    answer, fail_open, admitted = URL_CASES[case]
    key = PrivateKey.generate()
    verifier = await FakeVerifyURL(answers={key.public().raw: answer}).start()
    relay = new_relay()
    relay.admission = policy = AdmissionPolicy(verify_client_url=verifier.url, fail_open=fail_open, timeout=0.5)
    try:
        async with running_relay(relay) as worker:
            if admitted:
                client = await DerpClient.connect(worker.url, key)
                await client.close()
            else:
                await connect_expect_refused(worker.url, key)
    finally:
        await verifier.close()
    seen = verifier.requests[0]
    assert seen.method == "POST" and seen.target == "/verify"
    assert seen.headers["content-type"] == "application/json"
    assert json.loads(seen.body) == {"NodePublic": "nodekey:" + key.public().raw.hex(), "Source": "127.0.0.1"}
    assert policy.stats()["admitted" if admitted else "refused"] == 1


@pytest.mark.parametrize("fail_open", [True, False])
async def test_verify_url_unreachable(fail_open: bool, caplog: pytest.LogCaptureFixture) -> None:
    dead_port = free_port()  # bound and released: nothing listens there
    relay = new_relay()
    url = f"http://127.0.0.1:{dead_port}/verify"
    relay.admission = policy = AdmissionPolicy(verify_client_url=url, fail_open=fail_open, timeout=2)
    key = PrivateKey.generate()
    caplog.set_level(logging.WARNING, logger="relay_worker")
    async with running_relay(relay) as worker:
        if fail_open:
            client = await DerpClient.connect(worker.url, key)
            await client.close()
        else:
            await connect_expect_refused(worker.url, key)
    assert f"verify URL {url} unreachable" in caplog.text
    assert ("admitting" if fail_open else "refusing") + f" nodekey:{key.public().raw.hex()}" in caplog.text
    assert policy.stats()["fail_open_admits"] == (1 if fail_open else 0)
    assert policy.stats()["verifier_errors"]["url"] == 1


async def test_verify_url_over_https() -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    verifier = FakeVerifyURL()
    verifier.server = await asyncio.start_server(verifier._handle, "127.0.0.1", 0, ssl=server_ctx)
    verifier.port = verifier.server.sockets[0].getsockname()[1]
    url = f"https://127.0.0.1:{verifier.port}/verify"
    try:
        key = PrivateKey.generate().public().raw
        assert (await AdmissionPolicy(verify_client_url=url, ssl_context=client_ctx).decide(key)).allowed
        # an untrusted certificate is a failed TLS handshake: the verifier is unreachable, not a "yes"
        untrusting = AdmissionPolicy(verify_client_url=url, fail_open=False)
        assert not (await untrusting.decide(key)).allowed
        assert untrusting.stats()["refused_by_reason"] == {"url_unreachable": 1}
    finally:
        await verifier.close()


@pytest.mark.parametrize("framing", ["chunked", "eof"])
async def test_http_client_reads_chunked_and_eof_delimited_answers(framing: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        if framing == "chunked":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\n{\"All\r\n9;ext=1\r\now\": true\r\n1\r\n}\r\n0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"Allow\": true}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        policy = AdmissionPolicy(verify_client_url=f"http://127.0.0.1:{port}/v", fail_open=False)
        assert (await policy.decide(PrivateKey.generate().public().raw)).allowed
    finally:
        server.close()
        await server.wait_closed()


async def test_both_remote_checks_must_pass(tmp_sock_dir: Path) -> None:
    member, outsider = PrivateKey.generate(), PrivateKey.generate()
    api = await FakeLocalAPI(tmp_sock_dir / "ts.sock", {member.public().raw, outsider.public().raw}).start()
    verifier = await FakeVerifyURL(answers={outsider.public().raw: (200, b'{"Allow":false}', 0.0)}).start()
    policy = AdmissionPolicy(verify_clients=True, tailscaled_socket=str(api.path), verify_client_url=verifier.url)
    try:
        assert (await policy.decide(member.public().raw, "192.0.2.1")).allowed
        assert not (await policy.decide(outsider.public().raw, "192.0.2.1")).allowed
        assert len(api.requests) == 2 and len(verifier.requests) == 2
    finally:
        await api.close()
        await verifier.close()


async def test_localapi_200_must_carry_whois_json(tmp_sock_dir: Path) -> None:
    """Go's WhoIsNodeKey decodes the 200 body (json.Unmarshal into WhoIsResponse); a body that does not
    decode is an error, so derper refuses the client."""
    key = PrivateKey.generate().public().raw
    api = await FakeLocalAPI(tmp_sock_dir / "ts.sock", {key}).start()
    try:
        policy = AdmissionPolicy(verify_clients=True, tailscaled_socket=str(api.path))
        assert (await policy.decide(key)).allowed  # the fake's real whois document
        for bad in (b"not json", b'{"Node":{}} trailing', b"[1]", b'{"Node":"x"}'):
            api.body_override = bad
            decision = await AdmissionPolicy(verify_clients=True, tailscaled_socket=str(api.path)).decide(key)
            assert not decision.allowed and "WhoIsResponse JSON" in decision.reason, bad
        api.body_override = b"null"  # decodes (to a nil response) in Go too
        assert (await AdmissionPolicy(verify_clients=True, tailscaled_socket=str(api.path)).decide(key)).allowed
    finally:
        await api.close()


async def test_no_cache_by_default_every_connection_asks_with_its_own_source() -> None:
    """derper runs verifyClient on every connection with that connection's Source (D9)."""
    key = PrivateKey.generate().public().raw
    verifier = await FakeVerifyURL().start()
    policy = AdmissionPolicy(verify_client_url=verifier.url)
    try:
        assert (await policy.decide(key, "192.0.2.1")).allowed
        verifier.answers[key] = (200, b'{"Allow":false}', 0.0)  # removed from the tailnet
        assert not (await policy.decide(key, "192.0.2.2")).allowed, "no cached admit outlives the removal"
        assert [json.loads(r.body)["Source"] for r in verifier.requests] == ["192.0.2.1", "192.0.2.2"]
        assert policy.stats()["cache_entries"] == 0
    finally:
        await verifier.close()


@pytest.mark.parametrize("ending", ["stall", "close"])
async def test_verify_url_body_failing_after_200_head_refuses_even_fail_open(ending: str) -> None:
    """Go: Do returned (the head is in), then decoding the body failed: a refusal, never fail-open."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"Allow\"")
        await writer.drain()
        if ending == "close":
            writer.close()  # 8 of the 100 body bytes, then the connection ends
        else:
            await asyncio.sleep(30)

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        policy = AdmissionPolicy(verify_client_url=f"http://127.0.0.1:{port}/v", fail_open=True, timeout=0.5)
        decision = await policy.decide(PrivateKey.generate().public().raw)
        assert not decision.allowed and "answered 200 and its body failed" in decision.reason
        assert policy.stats()["fail_open_admits"] == 0
    finally:
        server.close()


# -- cache, shared lookups, slow verifiers --------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_cache_positive_negative_ttl_and_shared_inflight_lookup() -> None:
    good, bad = PrivateKey.generate().public().raw, PrivateKey.generate().public().raw
    verifier = await FakeVerifyURL(answers={good: (200, b'{"Allow":true}', 0.2),
                                            bad: (200, b'{"Allow":false}', 0.0)}).start()
    clock = FakeClock()
    policy = AdmissionPolicy(verify_client_url=verifier.url, cache_ttl=30, negative_ttl=5, clock=clock)
    try:
        # ten concurrent handshakes of one key: one request to the verifier
        results = await asyncio.gather(*(policy.decide(good) for _ in range(10)))
        assert all(r.allowed for r in results)
        assert len(verifier.requests) == 1
        assert policy.stats()["lookups_shared"] == 9
        assert (await policy.decide(good)).allowed and len(verifier.requests) == 1
        assert not (await policy.decide(bad)).allowed and len(verifier.requests) == 2
        assert not (await policy.decide(bad)).allowed and len(verifier.requests) == 2  # negative hit
        clock.now += 6  # past the negative TTL, within the positive one
        assert not (await policy.decide(bad)).allowed and len(verifier.requests) == 3
        assert (await policy.decide(good)).allowed and len(verifier.requests) == 3
        clock.now += 30
        assert (await policy.decide(good)).allowed and len(verifier.requests) == 4
        stats = policy.stats()
        assert stats["cache_hits"] == 3 and stats["cache_misses"] == 13
        assert stats["admitted"] == 13 and stats["refused_by_reason"] == {"url_denied": 3}
    finally:
        await verifier.close()


async def test_verifier_errors_are_cached_only_briefly() -> None:
    key = PrivateKey.generate().public().raw
    clock = FakeClock()
    policy = AdmissionPolicy(verify_client_url=f"http://127.0.0.1:{free_port()}/v", fail_open=True,
                             cache_ttl=30, clock=clock)
    assert (await policy.decide(key)).allowed
    assert (await policy.decide(key)).allowed
    assert policy.stats()["verifier_errors"]["url"] == 1  # the second answer came from the cache
    clock.now += policy.error_ttl + 0.1
    assert (await policy.decide(key)).allowed
    assert policy.stats()["verifier_errors"]["url"] == 2


async def test_slow_verifier_delays_neither_relaying_nor_other_handshakes() -> None:
    a_key, b_key, slow_key, d_key = (PrivateKey.generate() for _ in range(4))
    verifier = await FakeVerifyURL(answers={slow_key.public().raw: (200, b'{"Allow":true}', 5.0)}).start()
    relay = new_relay()
    relay.admission = AdmissionPolicy(verify_client_url=verifier.url, timeout=10)
    try:
        async with running_relay(relay) as worker, clients(
            DerpClient.connect(worker.url, a_key), DerpClient.connect(worker.url, b_key)
        ) as (a, b):
            slow = asyncio.create_task(DerpClient.connect(worker.url, slow_key, timeout=20))
            await asyncio.wait_for(verifier.event(slow_key.public().raw).wait(), 5)
            for i in range(50):
                await round_trip(a, b, b"rt %d" % i)
            # another client's handshake is not queued behind the slow one
            d = await DerpClient.connect(worker.url, d_key)
            await round_trip(d, a, b"d is in")
            await d.close()
            assert slow_key.public().raw not in verifier.answered, "relaying finished before the verifier answered"
            assert not slow.done()
            late = await asyncio.wait_for(slow, 15)
            assert slow_key.public().raw in verifier.answered
            await round_trip(late, a, b"late but admitted")
            await late.close()
    finally:
        await verifier.close()


async def test_lookup_queue_overload_refuses_instead_of_failing_open() -> None:
    keys = [PrivateKey.generate().public().raw for _ in range(3)]
    verifier = await FakeVerifyURL(default=(200, b'{"Allow":true}', 30.0)).start()
    policy = AdmissionPolicy(verify_client_url=verifier.url, fail_open=True, timeout=0.5, max_lookups=1)
    try:
        results = await asyncio.gather(*(policy.decide(k) for k in keys))
        # A lookup that reached the verifier timed out there (fail-open admits). One that never reached
        # it must not be admitted on the verifier's behalf. The first holds the only slot for the whole
        # timeout, so the last, queued as long, always times out in the queue; the second may get the
        # slot as the first lets go (which of the two timers fires first is the loop's business).
        reached = [verifier.event(k).is_set() for k in keys]
        assert reached[0] and not reached[2]
        assert [r.allowed for r in results] == reached
        assert policy.stats()["refused_by_reason"] == {"overloaded": reached.count(False)}
        assert policy.stats()["fail_open_admits"] == reached.count(True)
    finally:
        await verifier.close()


# -- allow-keys file ---------------------------------------------------------------------------------------


def test_parse_allow_keys() -> None:
    k1, k2 = "ab" * 32, "CD" * 32
    keys, bad = parse_allow_keys(f"# our nodes\n\nnodekey:{k1}   # laptop\n  NODEKEY:{k2}\nnodekey:zz\n{k1}\n")
    assert keys == {bytes.fromhex(k1), bytes.fromhex(k2)}
    assert [n for n, _ in bad] == [5, 6]


async def test_allow_keys_file_reloads_on_change_and_on_reload(tmp_path: Path) -> None:
    first, second = PrivateKey.generate().public().raw, PrivateKey.generate().public().raw
    path = tmp_path / "allow"
    path.write_text(f"nodekey:{first.hex()}\n")
    clock = FakeClock()
    policy = AdmissionPolicy(allow_keys_file=str(path), clock=clock)
    assert (await policy.decide(first)).allowed
    assert not (await policy.decide(second)).allowed
    path.write_text(f"nodekey:{first.hex()}\nnodekey:{second.hex()}\n# now {second.hex()[:8]} too\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert not (await policy.decide(second)).allowed, "checked at most once a second"
    clock.now += 1.1
    assert (await policy.decide(second)).allowed
    path.write_text("")
    policy.reload()  # SIGHUP
    assert not (await policy.decide(first)).allowed
    path.unlink()
    policy.reload()
    assert not (await policy.decide(first)).allowed  # missing file: nobody (fail closed)
    assert policy.stats()["allow_keys"] == 0


async def test_allow_keys_file_with_relay(tmp_path: Path) -> None:
    member, stranger = PrivateKey.generate(), PrivateKey.generate()
    path = tmp_path / "allow"
    path.write_text(f"nodekey:{member.public().raw.hex()}\n")
    relay = new_relay()
    policy = install(relay, verify_clients=False, tailscaled_socket="", verify_client_url="", fail_open=True,
                     allow_keys_file=str(path), cache_ttl=30, timeout=5)
    assert policy is relay.admission
    async with running_relay(relay) as worker:
        client = await DerpClient.connect(worker.url, member)
        await client.close()
        await connect_expect_refused(worker.url, stranger)
    assert policy is not None and policy.stats()["refused_by_reason"] == {"not_in_allow_keys_file": 1}


async def test_reload_forgets_cached_decisions() -> None:
    key = PrivateKey.generate().public().raw
    verifier = await FakeVerifyURL().start()
    policy = AdmissionPolicy(verify_client_url=verifier.url, cache_ttl=30)
    try:
        assert (await policy.decide(key)).allowed
        verifier.answers[key] = (200, b'{"Allow":false}', 0.0)  # the node was removed from the tailnet
        assert (await policy.decide(key)).allowed  # still cached
        policy.reload()  # SIGHUP
        assert not (await policy.decide(key)).allowed
        assert len(verifier.requests) == 2
    finally:
        await verifier.close()


def test_install_without_settings_leaves_relay_open() -> None:
    relay = new_relay()
    assert install(relay, verify_clients=False, tailscaled_socket="/x", verify_client_url="", fail_open=True,
                   allow_keys_file="", cache_ttl=30, timeout=5) is None
    assert relay.admission is None


def test_source_ip() -> None:
    assert source_ip(("127.0.0.1", 5)) == "127.0.0.1"
    assert source_ip(("::ffff:192.0.2.7", 5, 0, 0)) == "192.0.2.7"
    assert source_ip(("2001:db8::1", 5, 0, 0)) == "2001:db8::1"
    assert source_ip(None) == "" and source_ip("") == ""


# -- rate limits -------------------------------------------------------------------------------------------


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=100, burst=50, now=0.0)
    assert bucket.take(50, 0.0) and not bucket.take(1, 0.0)
    assert bucket.delay_for(10, 0.0) == pytest.approx(0.1)
    assert bucket.take(10, 0.1) and not bucket.take(1, 0.1)
    assert bucket.debit(100, 0.1) == pytest.approx(1.0)  # in debt: one second to pay back
    assert bucket.delay_for(0, 1.1) == 0.0
    assert bucket.take(50, 100.0) and not bucket.take(1, 100.0)  # refill is capped at burst
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


def test_accept_limiter_unit() -> None:
    clock = FakeClock()
    gate = AcceptLimiter(2, 3, clock=clock)
    peer = ("192.0.2.1", 1000)
    assert [gate(peer) for _ in range(5)] == [True, True, True, False, False]
    assert gate(None) and gate("")  # the admin unix socket is never limited
    clock.now += 0.5
    assert gate(peer) and not gate(peer)
    assert gate.stats()["refused"] == 3
    assert AcceptLimiter(0.5, 0).burst == 1 and AcceptLimiter(10, 0).burst == 10
    assert AcceptLimiter.from_settings(0.0, 0) is None and AcceptLimiter.from_settings(float("inf"), 0) is None


async def _http_get(port: int, path: str, headers: str = "", timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n".encode())
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


async def connect_burst(port: int, count: int) -> tuple[list[float], list[float], int]:
    """`count` simultaneous HTTP requests: (seconds of those served, of those refused, how many
    tokens may have come back while the burst ran)."""

    async def attempt() -> tuple[bool, float]:
        started = time.monotonic()
        try:
            answer = await _http_get(port, "/generate_204", timeout=5)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
        return answer.startswith(b"HTTP/1.1 204"), time.monotonic() - started

    burst_started = time.monotonic()
    results = await asyncio.gather(*(attempt() for _ in range(count)))
    refill = int(time.monotonic() - burst_started) + 1
    return [t for ok, t in results if ok], [t for ok, t in results if not ok], refill


async def test_accept_burst_beyond_limit_is_refused_quickly_while_others_are_served() -> None:
    relay = new_relay()
    gate = AcceptLimiter(1, 5)
    async with running_relay(relay, accept_gate=gate) as worker:
        served, refused, refill = await connect_burst(worker.port, 20)
        assert 5 <= len(served) <= 5 + refill, (served, refused)
        assert len(refused) == 20 - len(served)
        assert max(refused) < 2.0, "refusals are an immediate abort, not a hang"
        assert relay.stats.accept_rate_limited == len(refused) == gate.refused

        async def served_again() -> bool:
            return bool((await connect_burst(worker.port, 1))[0])

        deadline = time.monotonic() + 5
        while not await served_again():
            assert time.monotonic() < deadline, "the bucket never refilled"
            await asyncio.sleep(0.2)
        # a DERP client is served too once tokens are back
        await await_until(lambda: gate.bucket.delay_for(1, time.monotonic()) == 0, timeout=5)
        client = await DerpClient.connect(worker.url)
        await client.close()


RATE = 1_000_000
BURST = 200_000


async def _flood(sender: DerpClient, dst: bytes, size: int, stop: asyncio.Event) -> None:
    payload = os.urandom(size)
    while not stop.is_set():
        await sender.send(dst, payload)


async def _count(receiver: DerpClient, counter: list[int]) -> None:
    while True:
        packet = await receiver.recv_packet()
        counter[0] += len(packet.data)


async def held_rate(a: DerpClient, b: DerpClient, c: DerpClient, d: DerpClient) -> float:
    """Bytes/s that reach b while a floods it, measured past the burst; meanwhile c and d must
    relay at once (each round trip within 1 s)."""
    stop = asyncio.Event()
    received = [0]
    tasks = [asyncio.create_task(_flood(a, b.public_key, 16384, stop)), asyncio.create_task(_count(b, received))]
    try:
        await asyncio.sleep(0.5)  # measurement window, not synchronisation: past the burst
        start_bytes, started = received[0], time.monotonic()
        for i in range(30):
            await round_trip(c, d, b"small %d" % i, timeout=1.0)
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - started)))
        return (received[0] - start_bytes) / (time.monotonic() - started)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_read_limit_holds_a_client_to_its_rate_and_others_are_unaffected() -> None:
    relay = new_relay(token_bucket_rate=RATE, token_bucket_burst=BURST)
    async with running_relay(relay) as worker, clients(*(DerpClient.connect(worker.url) for _ in range(4))) as (
            a, b, c, d):
        # derper never advertises a token bucket (D1): the limit is server-side read pacing only
        assert a.server_info is not None and a.server_info.token_bucket_bytes_per_second == 0
        assert a.server_info.token_bucket_bytes_burst == 0
        rate = await held_rate(a, b, c, d)
        assert 0.7 * RATE <= rate <= 1.3 * RATE, f"relayed {rate:.0f} B/s for a {RATE} B/s client"
        assert read_limit_stats()["pauses"] > 0


async def test_probers_with_the_mesh_key_are_exempt_from_the_read_limit() -> None:
    # IsProber alone is self-declared; only a prober that also presents the mesh key is trusted.
    relay = new_relay(token_bucket_rate=RATE, token_bucket_burst=BURST, mesh_key="7a" * 32)
    async with running_relay(relay) as worker, clients(
            DerpClient.connect(worker.url, is_prober=True, mesh_key="7a" * 32),
            DerpClient.connect(worker.url)) as (prober, q):
        assert prober.server_info is not None
        total = 4 * RATE
        payload = os.urandom(16384)
        started = time.monotonic()

        async def send_all() -> None:
            for _ in range(total // len(payload)):
                await prober.send(q.public_key, payload)

        sender = asyncio.create_task(send_all())
        got = 0
        while got < (total // len(payload)) * len(payload):
            got += len((await q.recv_packet(5)).data)
        await sender
        assert time.monotonic() - started < 2.0, "a prober was held to the client rate"


# -- admin surfaces ------------------------------------------------------------------------------------------


async def asgi_get(app: Any, path: str, client: tuple[str, int], headers: dict[str, str] | None = None,
                   query: str = "") -> tuple[int, bytes]:
    """Call the ASGI app directly; `client` is only a value in the scope (no traffic goes anywhere)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [(b"host", b"derp.example")] + [(k.lower().encode(), v.encode()) for k, v in
                                                   (headers or {}).items()],
        "client": client, "server": ("127.0.0.1", 3340),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


ADMIN_PATHS = ["/debug/varz", "/metrics", "/debug/metrics"]
OUTSIDE = ("203.0.113.5", 1234)  # documentation address: a value in a dict, never contacted


@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_admin_paths_refuse_non_loopback_without_the_token(path: str) -> None:
    app = build_app(new_relay(), admin_token="s3cret")
    assert (await asgi_get(app, path, OUTSIDE))[0] == 403
    assert (await asgi_get(app, path, OUTSIDE, {"Authorization": "Bearer wrong"}))[0] == 403
    assert (await asgi_get(app, path, OUTSIDE, query="token=wrong"))[0] == 403
    assert (await asgi_get(app, path, OUTSIDE, {"Authorization": "Bearer s3cret"}))[0] == 200
    assert (await asgi_get(app, path, OUTSIDE, query="token=s3cret"))[0] == 200
    assert (await asgi_get(app, path, ("127.0.0.1", 5555)))[0] == 200
    assert (await asgi_get(app, path, ("::1", 5555)))[0] == 200
    assert (await asgi_get(app, "/", OUTSIDE))[0] == 200  # the public pages stay public


@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_admin_paths_without_a_configured_token_are_loopback_only(path: str) -> None:
    app = build_app(new_relay(), admin_token="")
    assert (await asgi_get(app, path, OUTSIDE))[0] == 403
    assert (await asgi_get(app, path, OUTSIDE, {"Authorization": "Bearer "}))[0] == 403
    assert (await asgi_get(app, path, OUTSIDE, query="token="))[0] == 403


async def test_admin_varz_answers_loopback_over_a_real_socket() -> None:
    relay = new_relay()
    async with running_relay(relay, admin_token="s3cret") as worker:
        answer = await _http_get(worker.port, "/debug/varz?local=1")  # JSON; plain /debug/varz is derper text
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert "worker" in json.loads(body)
        # a reverse proxy on this host that says the request came from outside: refused
        forwarded = await _http_get(worker.port, "/debug/varz", "X-Forwarded-For: 203.0.113.5\r\n")
        assert forwarded.startswith(b"HTTP/1.1 403"), forwarded[:200]
