"""cluster/tls.py, cluster/http_port.py and cluster/healthcheck.py as units, over real loopback TLS."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from cluster import tls
from cluster.config import Config, ConfigError, load_config
from cluster.healthcheck import check as health_check
from cluster.healthcheck import local_url
from cluster.http_port import SideServers, check_http_port, http_port_wanted
from tests.support import ClusterProcess, await_until, free_port

HOST = "derp.test"


def make_config(tmp_path: Path, **flags: Any) -> Config:
    base = {"server.state_dir": str(tmp_path / "state"), "server.certdir": str(tmp_path / "certs"),
            "server.listen": f"127.0.0.1:{free_port()}"}
    return load_config(None, None, {**base, **flags})


def write_cert(ca: trustme.CA, certdir: Path, stem: str = HOST, name: str = HOST) -> trustme.LeafCert:
    """Issue a cert for `name` and write it as certdir/stem.crt (chain) and certdir/stem.key."""
    certdir.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(name)
    crt = certdir / f"{stem}.crt"
    crt.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (certdir / f"{stem}.key").write_bytes(leaf.private_key_pem.bytes())
    return leaf


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def tls_echo() -> AsyncIterator[Any]:
    """Start a TLS server with a given context; yields a function returning its port."""
    servers: list[asyncio.Server] = []

    async def start(ctx: ssl.SSLContext) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def served_cert(port: int, ctx: ssl.SSLContext, name: str = HOST) -> bytes:
    """DER of the leaf cert a fresh TLS handshake to 127.0.0.1:port gets."""
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name), 5)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


def insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- build_ssl_context, one test per mode ----------------------------------------------------------


def test_dev_mode_is_plain_http(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert tls.build_ssl_context(config) is None
    assert tls.check_tls_config(config) is None


async def test_manual_loads_hostname_crt_and_key(tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext,
                                                 tls_echo: Any) -> None:
    leaf = write_cert(ca, tmp_path / "certs")
    config = make_config(tmp_path, **{"server.certmode": "manual", "server.hostname": HOST})
    ctx = tls.build_ssl_context(config)
    assert ctx is not None
    assert tls.check_tls_config(config) is None
    port = await tls_echo(ctx)
    der = await served_cert(port, client_ctx)  # verified against the trustme CA, name derp.test
    assert x509.load_der_x509_certificate(der).serial_number == serial_of(leaf)


@pytest.mark.parametrize("present", [[], ["server.crt", "server.key"], [f"{HOST}.crt"], [f"{HOST}.pem", f"{HOST}.key"]])
def test_manual_missing_or_misnamed_files_fail_with_one_line(tmp_path: Path, ca: trustme.CA,
                                                             present: list[str]) -> None:
    certdir = tmp_path / "certs"
    leaf_dir = tmp_path / "issued"
    write_cert(ca, leaf_dir)
    certdir.mkdir()
    for name in present:  # the right bytes under the wrong names must not be picked up
        source = leaf_dir / (f"{HOST}.key" if name.endswith(".key") else f"{HOST}.crt")
        (certdir / name).write_bytes(source.read_bytes())
    config = make_config(tmp_path, **{"server.certmode": "manual", "server.hostname": HOST})
    for call in (tls.build_ssl_context, tls.check_tls_config):
        with pytest.raises(ConfigError) as info:
            call(config)
        message = str(info.value)
        assert "\n" not in message
        assert message == (f"server.certdir: certmode manual needs {certdir}/{HOST}.crt and {certdir}/{HOST}.key "
                           "(files must be named exactly <hostname>.crt/.key)")


def test_manual_key_not_matching_cert_fails_with_one_line(tmp_path: Path, ca: trustme.CA) -> None:
    certdir = tmp_path / "certs"
    write_cert(ca, certdir)
    other = write_cert(ca, tmp_path / "other")
    (certdir / f"{HOST}.key").write_bytes(other.private_key_pem.bytes())
    config = make_config(tmp_path, **{"server.certmode": "manual", "server.hostname": HOST})
    with pytest.raises(ConfigError) as info:
        tls.check_tls_config(config)
    assert "\n" not in str(info.value) and str(certdir / f"{HOST}.crt") in str(info.value)


@pytest.mark.parametrize("name", ["derp.test", "203.0.113.7", "2001:db8::7"])
async def test_selfsigned_generates_reuses_and_pins(tmp_path: Path, tls_echo: Any, name: str) -> None:
    config = make_config(tmp_path, **{"server.certmode": "selfsigned", "server.hostname": name})
    ctx = tls.build_ssl_context(config)
    assert ctx is not None
    crt, key = tls.selfsigned_paths(config)
    assert crt.parent == config.state_path / "tls" and key.stat().st_mode & 0o077 == 0
    files = tls.ensure_selfsigned(config)
    assert re.fullmatch(r"sha256-raw:[0-9a-f]{64}", files.pin)
    # the pin is what a Tailscale client computes: sha256 over the DER of the leaf it is served
    der = await served_cert(await tls_echo(ctx), insecure_ctx(), name="localhost")
    assert files.pin == "sha256-raw:" + hashlib.sha256(der).hexdigest()
    cert = x509.load_der_x509_certificate(der)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert tls._general_name(name) in list(sans)
    # a restart reuses the cert, so the pin pasted into the derpMap stays valid
    before = crt.read_bytes()
    assert tls.build_ssl_context(config) is not None
    assert tls.ensure_selfsigned(config).pin == files.pin and crt.read_bytes() == before
    note = tls.check_tls_config(config)
    assert note is not None and files.pin in note


def test_selfsigned_regenerates_for_a_new_name(tmp_path: Path) -> None:
    first = tls.ensure_selfsigned(make_config(tmp_path, **{"server.certmode": "selfsigned",
                                                           "server.hostname": "a.test"}))
    second = tls.ensure_selfsigned(make_config(tmp_path, **{"server.certmode": "selfsigned",
                                                            "server.hostname": "b.test"}))
    assert first.pin != second.pin


def test_selfsigned_without_hostname_uses_listen_ip(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"server.certmode": "selfsigned"})
    assert tls.selfsigned_name(config) == "127.0.0.1"


def test_cert_pin_matches_der_of_file(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = write_cert(ca, tmp_path)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    assert tls.cert_pin(tmp_path / f"{HOST}.crt") == "sha256-raw:" + hashlib.sha256(der).hexdigest()


# -- CertReloader ----------------------------------------------------------------------------------


async def test_reloader_serves_replaced_cert_to_new_handshakes(tmp_path: Path, ca: trustme.CA,
                                                               client_ctx: ssl.SSLContext, tls_echo: Any) -> None:
    certdir = tmp_path / "certs"
    first = write_cert(ca, certdir)
    config = make_config(tmp_path, **{"server.certmode": "manual", "server.hostname": HOST})
    ctx = tls.build_ssl_context(config)
    assert ctx is not None
    port = await tls_echo(ctx)
    reloader = tls.CertReloader.for_config(ctx, config, interval=0.05)
    assert reloader is not None
    try:
        assert x509.load_der_x509_certificate(await served_cert(port, client_ctx)).serial_number == serial_of(first)
        second = write_cert(ca, certdir)  # renewal: same names, new cert and key
        await await_until(lambda: reloader.reloads >= 1, timeout=10, what="cert reload")
        der = await served_cert(port, client_ctx)
        assert x509.load_der_x509_certificate(der).serial_number == serial_of(second)
    finally:
        await reloader.stop()


def test_reloader_keeps_old_cert_until_the_pair_matches(tmp_path: Path, ca: trustme.CA) -> None:
    certdir = tmp_path / "certs"
    write_cert(ca, certdir)
    crt, key = certdir / f"{HOST}.crt", certdir / f"{HOST}.key"
    ctx = tls.new_server_context()
    ctx.load_cert_chain(crt, key)
    reloader = tls.CertReloader(ctx, crt, key)
    assert reloader.check() is False  # nothing changed
    renewed = write_cert(ca, tmp_path / "renewed")
    # a renewal caught half way: new cert, old key
    crt.write_bytes((tmp_path / "renewed" / f"{HOST}.crt").read_bytes())
    assert reloader.check() is False and reloader.failures == 1 and reloader.reloads == 0
    key.write_bytes(renewed.private_key_pem.bytes())
    assert reloader.check() is True and reloader.reloads == 1
    assert reloader.check() is False  # and only once


def test_reloader_ignores_a_briefly_missing_file(tmp_path: Path, ca: trustme.CA) -> None:
    certdir = tmp_path / "certs"
    write_cert(ca, certdir)
    crt, key = certdir / f"{HOST}.crt", certdir / f"{HOST}.key"
    ctx = tls.new_server_context()
    ctx.load_cert_chain(crt, key)
    reloader = tls.CertReloader(ctx, crt, key)
    crt.unlink()
    assert reloader.check() is False and reloader.failures == 0


def test_reloader_not_started_in_dev_mode(tmp_path: Path) -> None:
    assert tls.CertReloader.for_config(None, make_config(tmp_path)) is None


# -- the plain-HTTP port ---------------------------------------------------------------------------


async def http_get(port: int, path: str, headers: str = "", method: str = "GET") -> tuple[str, dict[str, str]]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n{headers}\r\n".encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
    writer.close()
    status, *lines = head.strip().split("\r\n")
    return status, {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}


def test_http_port_only_beside_tls(tmp_path: Path) -> None:
    assert http_port_wanted(make_config(tmp_path, **{"server.http_port": 80})) is None  # dev: DERP port is HTTP
    assert http_port_wanted(make_config(tmp_path, **{"server.certmode": "selfsigned"})) is None  # -1 = off
    assert http_port_wanted(make_config(tmp_path, **{"server.certmode": "selfsigned", "server.http_port": 80})) == 80


def test_http_port_taken_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = make_config(tmp_path, **{"server.certmode": "selfsigned", "server.http_port": port})
        with pytest.raises(ConfigError, match=r"^server.http_port \(--http-port\): 127.0.0.1:\d+ is already in use"):
            check_http_port(config)


async def test_http_port_serves_generate_204_and_redirects(tmp_path: Path) -> None:
    port = free_port()
    config = make_config(tmp_path, **{"server.certmode": "selfsigned", "server.hostname": HOST,
                                      "server.http_port": port})
    check_http_port(config)
    side = await SideServers.start(config)
    try:
        status, headers = await http_get(port, "/generate_204", "X-Tailscale-Challenge: abc.DEF-1:2\r\n")
        assert status == "HTTP/1.1 204 No Content"
        assert headers["x-tailscale-response"] == "response abc.DEF-1:2"
        assert headers["cache-control"] == "no-cache, no-store, must-revalidate, no-transform, max-age=0"
        status, headers = await http_get(port, "/generate_204", "X-Tailscale-Challenge: bad challenge!\r\n")
        assert status.startswith("HTTP/1.1 204") and "x-tailscale-response" not in headers
        status, headers = await http_get(port, "/derp/probe?x=1")
        assert status == "HTTP/1.1 302 Found"
        assert headers["location"] == f"https://{HOST}:{config.listen_addr[1]}/derp/probe?x=1"
        status, _ = await http_get(port, "/derp", method="POST")
        assert status.startswith("HTTP/1.1 400")
    finally:
        await side.stop()


# -- healthcheck -----------------------------------------------------------------------------------


def test_healthcheck_local_url(tmp_path: Path) -> None:
    assert local_url(load_config(None, {"DERP_ADDR": ":443", "DERP_CERT_MODE": "selfsigned"})) == \
        "https://127.0.0.1:443/derp"
    assert local_url(load_config(None, {"DERP_ADDR": "[::]:3340"})) == "http://[::1]:3340/derp"
    assert local_url(load_config(None, {"DERP_ADDR": "10.1.2.3:8443"})) == "http://10.1.2.3:8443/derp"


@pytest.fixture(scope="module")
def dev_cluster() -> Iterator[ClusterProcess]:
    with ClusterProcess(workers=1) as cluster:
        yield cluster


def test_healthcheck_relays_through_a_running_node(dev_cluster: ClusterProcess) -> None:
    config = load_config(None, {"DERP_ADDR": f"127.0.0.1:{dev_cluster.port}"})
    assert health_check(config) == (True, f"http://127.0.0.1:{dev_cluster.port}/derp relayed a packet")
    result = subprocess.run([sys.executable, "-m", "cluster.healthcheck", "--listen", f"127.0.0.1:{dev_cluster.port}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "relayed a packet" in result.stdout


def test_healthcheck_fails_fast_when_nothing_relays(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "cluster.healthcheck", "--listen", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stderr.startswith("unhealthy: http://127.0.0.1:")
    # a port that accepts TCP but never speaks DERP: unhealthy within the check's own deadline
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        config = load_config(None, {"DERP_ADDR": f"127.0.0.1:{mute.getsockname()[1]}"})
        healthy, problem = health_check(config, timeout=0.5)
    assert not healthy and "no relayed packet within 0.5s" in problem


def test_healthcheck_with_admission_on(tmp_path: Path) -> None:
    # Only tailnet nodes are admitted (and the tailscaled socket is missing, so nobody is): the
    # check's throwaway keys pass with derper's mesh key, as mesh peers do, and still relay.
    mesh_key = tmp_path / "mesh.key"
    mesh_key.write_text(os.urandom(32).hex() + "\n")
    dead = socket.socket(socket.AF_UNIX)  # tailscaled's socket exists but nobody answers on it
    dead.bind(tempfile.mktemp(prefix="ts-", suffix=".sock", dir="/tmp"))
    env = {"DERP_VERIFY_CLIENTS": "true", "DERP_TAILSCALED_SOCKET": dead.getsockname(),
           "DERP_MESH_KEY_FILE": str(mesh_key)}
    with dead, ClusterProcess(env=env) as node:
        with_key = load_config(None, {**env, "DERP_ADDR": f"127.0.0.1:{node.port}"})
        assert health_check(with_key) == (True, f"http://127.0.0.1:{node.port}/derp relayed a packet")
        # without the key all it can say is that the DERP handshake is answered, and it says so
        without_key = load_config(None, {"DERP_VERIFY_CLIENTS": "true", "DERP_ADDR": f"127.0.0.1:{node.port}"})
        healthy, what = health_check(without_key)
        assert healthy and "answered the DERP handshake" in what and "mesh_key_file" in what
        # a stranger really is refused, so the full check above did need the key
        assert not health_check(load_config(None, {"DERP_ADDR": f"127.0.0.1:{node.port}"}))[0]
