"""The HTTP edge against derper's source (cmd/derper/derper.go, derp/derpserver/handler.go,
websocket.go, tsweb): routing (C6), headers and bodies (C7), --home, the raw DERP fall-through for
`Upgrade: websocket` (B3), /bootstrap-dns (D13), the monitoring surface (D6), dual-stack listening
(D7), the listener's TCP options (D2) and the accept gate's close (D14). Real processes and sockets;
the admin-address rules, which need a source address loopback cannot give, go through the ASGI app.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from relay_worker.client import DerpClient
from relay_worker.http_app import BROWSER_HEADERS, build_app
from relay_worker.keys import PrivateKey
from relay_worker.relay import Relay
from relay_worker.server import make_listen_socket
from stun.client import stun_request
from tests.support import ClusterProcess, free_port


@pytest.fixture(scope="module")
def node() -> Iterator[ClusterProcess]:
    with ClusterProcess("--bootstrap-dns-names", "localhost", "--unpublished-bootstrap-dns-names",
                        "localhost.localdomain", workers=1) as cluster:
        yield cluster


def raw(port: int, request: bytes, host: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Send one request, read until the server closes (or `timeout`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(request)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def req(method: str, path: str, headers: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: derp.example\r\nConnection: close\r\n{headers}\r\n".encode()


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


# -- C6: routing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/derp/", "/derp/probe/x", "/generate_204/", "/index.html"])
def test_unmatched_paths_are_the_home_page(node: ClusterProcess, path: str) -> None:
    status, headers, body = parse(raw(node.port, req("GET", path)))
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8" and b"<h1>DERP</h1>" in body


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PROPFIND"])
def test_plain_derp_is_426_whatever_the_method(node: ClusterProcess, method: str) -> None:
    status, headers, body = parse(raw(node.port, req(method, "/derp")))
    assert status == 426 and body == b"DERP requires connection upgrade\n"  # http.Error's text
    assert headers["content-type"] == "text/plain; charset=utf-8" and headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PROPFIND"])
def test_generate_204_answers_any_method(node: ClusterProcess, method: str) -> None:
    status, _, body = parse(raw(node.port, req(method, "/generate_204")))
    assert status == 204 and body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PROPFIND"])
def test_probe_paths_refuse_other_methods_with_derpers_text(node: ClusterProcess, method: str) -> None:
    for path in ("/derp/probe", "/derp/latency-check"):
        status, _, body = parse(raw(node.port, req(method, path)))
        assert status == 405 and body == b"bogus probe method\n"


def test_upgrade_derp_without_connection_upgrade_is_101(node: ClusterProcess) -> None:
    answer = raw(node.port, b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n", timeout=2)
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n"), answer[:80]
    body = answer.partition(b"\r\n\r\n")[2]
    assert body[:1] == b"\x01" and body[5:13] == b"DERP\xf0\x9f\x94\x91"  # ServerKey follows at once


# -- B3: Upgrade: websocket without the derp subprotocol is raw DERP --------------------------------------


@pytest.mark.parametrize("protocol", [None, "chat", "DERP"])
def test_websocket_upgrade_without_derp_subprotocol_is_raw_derp(node: ClusterProcess, protocol: str | None) -> None:
    extra = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    answer = raw(node.port, f"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n"
                            f"{extra}\r\n".encode(), timeout=2)
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n"), answer[:80]


def test_websocket_with_derp_substring_only_is_closed_1008(node: ClusterProcess) -> None:
    """"derp" inside another token: WebSocket (Go tests strings.Contains), but no subprotocol is
    negotiated, so the server closes with 1008 as derper does."""
    import base64
    import os

    key = base64.b64encode(os.urandom(16)).decode()
    answer = raw(node.port, (f"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                             f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
                             f"Sec-WebSocket-Protocol: underpants\r\n\r\n").encode(), timeout=3)
    assert answer.startswith(b"HTTP/1.1 101 "), answer[:80]
    assert b"upgrade: websocket" in answer.lower()
    frame = answer.partition(b"\r\n\r\n")[2]
    assert frame[0] == 0x88 and int.from_bytes(frame[2:4], "big") == 1008


# -- C7: headers, bodies, --home --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/robots.txt", "/bootstrap-dns"])
def test_browser_headers(node: ClusterProcess, path: str) -> None:
    _, headers, _ = parse(raw(node.port, req("GET", path)))
    for name, value in BROWSER_HEADERS.items():
        assert headers[name.lower()] == value, name


def test_home_blank_and_redirect() -> None:
    with ClusterProcess("--home", "blank", workers=1) as blank:
        status, headers, body = parse(raw(blank.port, req("GET", "/")))
        assert status == 200 and body == b"" and headers["content-type"] == "text/html; charset=utf-8"
    with ClusterProcess("--home", "https://example.com/derp-info", workers=1) as redirect:
        status, headers, body = parse(raw(redirect.port, req("GET", "/anything")))
        assert status == 302 and headers["location"] == "https://example.com/derp-info"
        assert body == b'<a href="https://example.com/derp-info">Found</a>.\n\n'


def test_bad_home_value_is_refused_at_start() -> None:
    cluster = ClusterProcess("--home", "ftp://nope", workers=1)
    with pytest.raises(AssertionError, match="home"):
        cluster.start()
    cluster.stop()
    cluster.tmp.cleanup()


# -- D13: /bootstrap-dns -------------------------------------------------------------------------------


def test_bootstrap_dns_publishes_configured_names(node: ClusterProcess) -> None:
    deadline = time.monotonic() + 10
    while True:
        status, headers, body = parse(raw(node.port, req("GET", "/bootstrap-dns")))
        if body or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # poll: the first resolution runs in the background after start
    assert status == 200 and headers["connection"] == "close" and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert list(doc) == ["localhost"] and ("127.0.0.1" in doc["localhost"] or "::1" in doc["localhost"])
    assert body.startswith(b'{\n\t"localhost": [\n\t\t"')  # json.MarshalIndent(..., "", "\t")
    # an unpublished name answers only to ?q=, and only with itself
    _, _, answer = parse(raw(node.port, req("GET", "/bootstrap-dns?q=localhost.localdomain")))
    assert list(json.loads(answer)) in (["localhost.localdomain"], ["localhost"])


def test_bootstrap_dns_without_names_is_an_empty_body() -> None:
    with ClusterProcess(workers=1) as bare:
        status, headers, body = parse(raw(bare.port, req("GET", "/bootstrap-dns")))
        assert status == 200 and body == b"" and headers["connection"] == "close"


# -- D6: monitoring ---------------------------------------------------------------------------------------


def prometheus(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_debug_varz_is_derpers_prometheus_text(node: ClusterProcess) -> None:
    a = await DerpClient.connect(node.url, timeout=10)
    b = await DerpClient.connect(node.url, websocket=True, timeout=10)
    try:
        await a.send(b.public_key, b"x" * 40)
        await b.recv_packet(timeout=5)
        _, headers, body = parse(raw(node.port, req("GET", "/debug/varz")))
    finally:
        await a.close()
        await b.close()
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    metrics = prometheus(text)
    assert not [name for name in metrics if name.endswith("_total") and name != "derp_clients_total"]
    assert "# TYPE derp_accepts counter" in text and "# TYPE derp_current_connections gauge" in text
    assert metrics["derp_current_connections"] >= 2 and metrics["derp_packets_sent"] >= 1
    assert metrics["derp_websocket_accepts"] >= 1
    assert metrics["derp_clients_local"] >= 2 and metrics["derp_clients_total"] >= 2
    assert metrics["derp_current_file_descriptors"] > 0 and "derp_watchers" in metrics
    reasons = ("unknown_dest", "unknown_dest_on_fwd", "gone_disconnected", "queue_head", "queue_tail",
               "write_error", "dup_client")
    for reason in reasons:
        for kind in ("disco", "other"):
            assert f'derp_packets_dropped{{reason="{reason}",kind="{kind}"}}' in metrics


def test_debug_vars_and_index(node: ClusterProcess) -> None:
    status, headers, body = parse(raw(node.port, req("GET", "/debug/vars")))
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert "gauge_current_connections" in doc["derp"] and "accepts" in doc["derp"]
    status, _, body = parse(raw(node.port, req("GET", "/debug/")))
    assert status == 200 and b"/debug/varz" in body and b"/debug/vars" in body
    status, headers, _ = parse(raw(node.port, req("GET", "/debug")))
    assert status == 301 and headers["location"] == "/debug/"
    # our own names stay at /metrics
    _, _, body = parse(raw(node.port, req("GET", "/metrics")))
    assert b"derp_accepts_total" in body


async def _asgi_status(app: Any, path: str, client: tuple[str, int], headers: dict[str, str] | None = None) -> int:
    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
             "client": client, "server": ("127.0.0.1", 443), "scheme": "https", "http_version": "1.1",
             "root_path": ""}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


@pytest.mark.parametrize(("host", "allowed"), [
    ("100.64.0.1", True), ("100.127.255.254", True), ("100.115.92.5", False),  # ChromeOS VM range
    ("fd7a:115c:a1e0::1", True), ("fd7a:115c:a1e1::1", False), ("::ffff:100.100.1.1", True),
    ("203.0.113.9", False), ("10.0.0.1", False), ("127.0.0.1", True), ("::1", True),
])
async def test_debug_access_follows_tsweb(host: str, allowed: bool) -> None:
    app = build_app(Relay(PrivateKey.generate()), admin_token="tok")
    for path in ("/debug/varz", "/debug/vars", "/debug/", "/metrics"):
        assert (await _asgi_status(app, path, (host, 1234)) == 200) is allowed, (path, host)
        # any X-Forwarded-For is refused, wherever the request comes from; the token still opens
        assert await _asgi_status(app, path, (host, 1234), {"X-Forwarded-For": "127.0.0.1"}) == 403
        assert await _asgi_status(app, path, (host, 1234), {"X-Forwarded-For": "1.2.3.4",
                                                            "Authorization": "Bearer tok"}) == 200


# -- D7: dual stack --------------------------------------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_colon_port_listens_on_both_families_for_derp_and_stun() -> None:
    port, stun_port = free_port(host="::1"), free_port(socket.SOCK_DGRAM)
    cluster = ClusterProcess(workers=1, port=port)
    base = ClusterProcess.command(cluster)
    assert base[4] == "--listen" and "--no-stun" in base
    command = [*base[:5], f":{port}", *(a for a in base[6:] if a != "--no-stun"), "--stun", f":{stun_port}"]
    cluster.command = lambda: command  # type: ignore[method-assign]
    with cluster:
        for host in ("127.0.0.1", "::1"):
            status, _, _ = parse(raw(port, req("GET", "/generate_204"), host=host))
            assert status == 204, host
        for host in ("127.0.0.1", "::1"):
            result = await stun_request(host, stun_port, timeout=5)
            assert result, host


# -- D2: TCP_USER_TIMEOUT and keepalive on accepted sockets ----------------------------------------------


def test_accepted_sockets_carry_derpers_tcp_timeouts() -> None:
    listener = make_listen_socket("127.0.0.1", 0, reuse_port=False)
    listener.setblocking(True)
    try:
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 15000
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 600
    finally:
        listener.close()


# -- D14: the accept gate closes with a FIN -------------------------------------------------------------


async def _refused_with_fin(port: int) -> bytes:
    """Connect and send nothing (unread bytes would turn any close into a reset): what comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b"RST"
    finally:
        writer.close()


async def test_accept_rate_gate_closes_with_a_fin() -> None:
    """A guard, not a regression test: the old abort() was a FIN too when the client had sent
    nothing. What changed for D14 is where the gate runs with TLS (next test)."""
    with ClusterProcess("--accept-connection-limit", "0.001", "--accept-connection-burst", "1",
                        workers=1) as cluster:
        status, _, _ = parse(raw(cluster.port, req("GET", "/generate_204")))
        assert status == 204
        assert [await _refused_with_fin(cluster.port) for _ in range(2)] == [b"", b""]  # FIN, not reset


async def test_accept_rate_gate_runs_before_tls() -> None:
    """derper's rateLimitedListener closes the TCP connection before any TLS. Before, the gate ran
    after the handshake: a refused client that sent no ClientHello waited for the handshake timeout."""
    with ClusterProcess("--certmode", "selfsigned", "--hostname", "127.0.0.1",
                        "--accept-connection-limit", "0.001", "--accept-connection-burst", "1",
                        workers=1) as cluster:
        # the burst's one connection (if nothing took it yet): accepted, waiting for a ClientHello
        _, first = await asyncio.open_connection("127.0.0.1", cluster.port)
        first.close()
        started = time.monotonic()
        assert await _refused_with_fin(cluster.port) == b""
        assert time.monotonic() - started < 5


# -- C12: the WebSocket peer is the TCP peer, never X-Forwarded-For ----------------------------------


async def test_websocket_peer_address_ignores_x_forwarded_for(tmp_path: Any) -> None:
    """uvicorn's proxy_headers made a loopback X-Forwarded-For the WebSocket peer (PeerPresent and
    admission Source became the XFF IP with port 0). derper uses the TCP peer."""
    import ipaddress
    import secrets

    from relay_worker.frames import PeerPresent

    mesh_key = secrets.token_hex(32)
    key_file = tmp_path / "mesh.key"
    key_file.write_text(mesh_key)
    with ClusterProcess("--mesh-key-file", str(key_file), workers=1) as cluster:
        watcher = await DerpClient.connect(cluster.url, mesh_key=mesh_key, timeout=10)
        await watcher.watch_conns()
        client = await DerpClient.connect(cluster.url, websocket=True, timeout=10,
                                          extra_headers={"X-Forwarded-For": "203.0.113.7"})
        try:
            deadline = time.monotonic() + 10
            seen = None
            while seen is None:
                event = await watcher.recv(timeout=max(0.1, deadline - time.monotonic()))
                if isinstance(event, PeerPresent) and event.key == client.public_key:
                    seen = event
            ip = ipaddress.ip_address(seen.ip) if seen.ip else None
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            assert str(ip) == "127.0.0.1" and seen.port != 0, seen
        finally:
            await client.close()
            await watcher.close()


async def test_websocket_and_raw_derp_over_tls_behind_the_gate() -> None:
    """Both DERP transports through the protocol's own TLS (the gate runs before it, D14)."""
    import ssl

    with ClusterProcess("--certmode", "selfsigned", "--hostname", "127.0.0.1",
                        "--accept-connection-limit", "1000", workers=1) as cluster:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        url = f"https://127.0.0.1:{cluster.port}/derp"
        raw_client = await DerpClient.connect(url, ssl_context=ctx, timeout=10)
        ws_client = await DerpClient.connect(url, ssl_context=ctx, websocket=True, timeout=10)
        try:
            await raw_client.send(ws_client.public_key, b"over wss")
            assert (await ws_client.recv_packet(timeout=5)).data == b"over wss"
            await ws_client.send(raw_client.public_key, b"over tls")
            assert (await raw_client.recv_packet(timeout=5)).data == b"over tls"
        finally:
            await raw_client.close()
            await ws_client.close()


def test_pipelined_requests_are_answered_in_order(node: ClusterProcess) -> None:
    """Go's net/http serves a connection's requests one after another; so do we (the rest of a
    read waits for each response)."""
    pipeline = (b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /generate_204 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = raw(node.port, pipeline)
    import re

    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [200, 204, 405, 426], answer


@pytest.mark.parametrize(("path", "location"), [("//derp", "/derp"), ("/a/../derp/probe?x=1", "/derp/probe?x=1"),
                                                ("/./robots.txt", "/robots.txt"), ("/debug//", "/debug/")])
def test_unclean_paths_redirect_as_servemux(node: ClusterProcess, path: str, location: str) -> None:
    status, headers, _ = parse(raw(node.port, req("GET", path)))
    assert status == 301 and headers["location"] == location


def test_tcp_timeouts_can_be_set_and_turned_off() -> None:
    listener = make_listen_socket("127.0.0.1", 0, reuse_port=False, user_timeout=2.5, keepalive_idle=0)
    try:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        listener.close()


def test_websocket_batches_fit_go_clients_message_limit(node: ClusterProcess) -> None:
    """A burst for a WebSocket client goes out as messages Tailscale's client accepts (at most 32 KiB
    each; a larger one made tailscaled drop the connection and lose what was queued)."""

    async def run() -> None:
        sender = await DerpClient.connect(node.url)
        receiver = await DerpClient.connect(node.url, websocket=True)  # refuses messages over 32 KiB
        try:
            await sender.send(receiver.public_key, b"warm")
            await receiver.recv_packet(timeout=5)
            # a burst of small packets, and packets of DERP's full 64 KiB, each batch over 32 KiB
            sizes = [1200] * 200 + [65536] * 4
            for index, size in enumerate(sizes):
                sender.send_nowait(receiver.public_key, index.to_bytes(4, "big") + bytes(size - 4))
            await sender.flush()
            got = [await receiver.recv_packet(timeout=5) for _ in sizes]
            assert [int.from_bytes(p.data[:4], "big") for p in got] == list(range(len(sizes)))
            assert [len(p.data) for p in got] == sizes
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(run())
