"""certmode manual as derper runs it (C9), and derper's meta certificate in every TLS chain (D3)."""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster import tls
from cluster.config import Config, ConfigError, load_config
from relay_worker.client import DerpClient
from relay_worker.keys import PrivateKey
from tests.support import ClusterProcess, free_port

HOST = "derp.test"


def make_config(tmp_path: Path, **flags: Any) -> Config:
    base = {"server.state_dir": str(tmp_path / "state"), "server.certdir": str(tmp_path / "certs"),
            "server.listen": f"127.0.0.1:{free_port()}", "server.certmode": "manual"}
    return load_config(None, None, {**base, **flags})


def write_pair(certdir: Path, stem: str, cert_pem: bytes, key_pem: bytes) -> None:
    certdir.mkdir(parents=True, exist_ok=True)
    (certdir / f"{stem}.crt").write_bytes(cert_pem)
    (certdir / f"{stem}.key").write_bytes(key_pem)


def own_cert(names: list[str], *, days: float = 30, start_days: float = -1) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else HOST)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now + datetime.timedelta(days=start_days))
               .not_valid_after(now + datetime.timedelta(days=days)))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([tls._general_name(n) for n in names]),
                                        critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_file_names_are_sanitised_as_derper_does(tmp_path: Path) -> None:
    assert tls.cert_basename("2001:db8::1") == "2001db81"
    assert tls.cert_basename("derp.example.com") == "derp.example.com"
    assert tls.cert_basename("we ird/../x_y") == "weird..xy"
    config = make_config(tmp_path, **{"server.hostname": "2001:db8::1"})
    crt, key = tls.manual_cert_paths(config)
    assert (crt.name, key.name) == ("2001db81.crt", "2001db81.key")


@pytest.mark.parametrize(("names", "days", "start", "problem"), [
    (["other.test"], 30, -1, "is not valid for server.hostname 'derp.test' (it covers other.test)"),
    ([], 30, -1, "(it covers no subjectAltName)"),  # Go ignores the CN since 1.15
    (["*.test"], -1, -30, "expired on"),
    ([HOST], 30, 2, "is not valid before"),
])
def test_manual_refuses_a_cert_that_would_fail_clients(tmp_path: Path, names: list[str], days: float, start: float,
                                                        problem: str) -> None:
    write_pair(tmp_path / "certs", HOST, *own_cert(names, days=days, start_days=start))
    with pytest.raises(ConfigError) as info:
        tls.check_tls_config(make_config(tmp_path, **{"server.hostname": HOST}))
    message = str(info.value)
    assert problem in message and "\n" not in message and str(tmp_path / "certs" / f"{HOST}.crt") in message


def test_manual_accepts_wildcard_and_names_the_unreadable_file(tmp_path: Path) -> None:
    write_pair(tmp_path / "certs", HOST, *own_cert(["*.test"]))
    assert tls.check_tls_config(make_config(tmp_path, **{"server.hostname": HOST})) is None
    key = tmp_path / "certs" / f"{HOST}.key"
    key.unlink()
    key.mkdir()  # present but unreadable as a file (tests run as root, so no chmod trick)
    with pytest.raises(ConfigError, match=rf"cannot read {key}: Is a directory"):
        tls.check_tls_config(make_config(tmp_path, **{"server.hostname": HOST}))


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
async def test_ip_hostname_without_files_gets_derpers_self_signed_cert(tmp_path: Path, ip: str) -> None:
    config = make_config(tmp_path, **{"server.hostname": ip})
    note = tls.check_tls_config(config)
    crt = tmp_path / "certs" / f"{tls.cert_basename(ip)}.crt"
    assert note is not None and str(crt) in note and tls.cert_pin(crt) in note
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=364) < lifetime <= datetime.timedelta(days=366)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    assert (tmp_path / "certs" / f"{tls.cert_basename(ip)}.key").stat().st_mode & 0o077 == 0
    before = crt.read_bytes()
    tls.check_tls_config(config)
    assert crt.read_bytes() == before  # reused: the pin stays


def _handshake(port: int, server_name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as conn:
        return conn.getpeercert(binary_form=True)


async def _serve(ctx: ssl.SSLContext) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


async def test_sni_must_name_a_dns_hostname_but_not_an_ip(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST)
    write_pair(tmp_path / "certs", HOST, b"".join(b.bytes() for b in leaf.cert_chain_pems),
               leaf.private_key_pem.bytes())
    ctx = tls.build_ssl_context(make_config(tmp_path, **{"server.hostname": HOST}))
    assert ctx is not None
    server = await _serve(ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await asyncio.to_thread(_handshake, port, HOST)
        assert await asyncio.to_thread(_handshake, port, HOST.upper())
        for wrong in ("other.test", None):  # derper: "cert mismatch with hostname", no SNI included
            with pytest.raises(ssl.SSLError):
                await asyncio.to_thread(_handshake, port, wrong)
    finally:
        server.close()
    ip_ctx = tls.build_ssl_context(make_config(tmp_path / "ip", **{"server.hostname": "127.0.0.1"}))
    assert ip_ctx is not None
    server = await _serve(ip_ctx)
    try:
        for name in ("127.0.0.1", "anything.test", None):  # an IP hostname: no SNI check, as derper
            assert await asyncio.to_thread(_handshake, server.sockets[0].getsockname()[1], name)
    finally:
        server.close()


# -- the meta certificate (D3) -------------------------------------------------------------------------


def peer_chain(port: int, server_name: str) -> list[x509.Certificate]:
    """Every certificate the server sends, as a TLS client receives them (openssl s_client)."""
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name,
                          "-showcerts"], input="", capture_output=True, text=True, timeout=30).stdout
    blocks = out.split("-----BEGIN CERTIFICATE-----")[1:]
    return [x509.load_pem_x509_certificate(("-----BEGIN CERTIFICATE-----" + b.split("-----END CERTIFICATE-----")[0]
                                            + "-----END CERTIFICATE-----\n").encode()) for b in blocks]


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


@pytest.mark.filterwarnings("ignore:Attribute.s length must be")
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line client")
def test_tls_chain_carries_derpers_meta_cert_with_the_server_key(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST)
    certdir = tmp_path / "certs"
    write_pair(certdir, HOST, b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes())
    server_key = PrivateKey.generate()
    key_file = tmp_path / "derper.key"
    key_file.write_text(json.dumps({"PrivateKey": server_key.text()}))
    with ClusterProcess("--certmode", "manual", "--hostname", HOST, "--certdir", str(certdir),
                        "-c", str(key_file)) as node:
        chain = peer_chain(node.port, HOST)
        metas = [c for c in chain if common_name(c).startswith("derpkey")]
        assert len(metas) == 1 and chain[-1] == metas[0], "after the operator's chain"
        meta = metas[0]
        assert common_name(meta) == "derpkey" + server_key.public().raw.hex()
        assert meta.serial_number == 2  # derp.ProtocolVersion; parseMetaCert wants <= 8 bits
        assert meta.issuer == meta.subject
        assert meta.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        # the operator's leaf is still first, so CA verification and CertName pins are unchanged
        assert chain[0].public_bytes(serialization.Encoding.PEM) == leaf.cert_chain_pems[0].bytes()

        async def verified_derp() -> bytes:
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            client = await DerpClient.connect(f"https://127.0.0.1:{node.port}/derp", ssl_context=ctx,
                                              server_hostname=HOST)
            try:
                return client.server_public
            finally:
                await client.close()

        assert asyncio.run(verified_derp()) == server_key.public().raw
        go_sees = go_peer_chain(node.port, HOST, tmp_path)
        if go_sees is not None:  # Go's crypto/tls parses the whole chain; parseMetaCert wants these
            assert go_sees[-1] == ("derpkey" + server_key.public().raw.hex(), 2)


def go_peer_chain(port: int, server_name: str, tmp_path: Path) -> list[tuple[str, int]] | None:
    """(CN, serial) of each certificate as Go's TLS client receives them; None without Go."""
    if shutil.which("go") is None:
        return None
    binary = tmp_path / "tlspeek"
    build = subprocess.run(["go", "build", "-o", str(binary), "./cmd/tlspeek"],
                           cwd=Path(__file__).parents[1] / "interop", capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(binary), f"127.0.0.1:{port}", server_name], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [(cn, int(serial)) for cn, serial in (line.split("\t") for line in out.stdout.splitlines())]


def test_cluster_up_refuses_a_manual_cert_for_another_name(tmp_path: Path) -> None:
    write_pair(tmp_path / "certs", HOST, *own_cert(["other.test"]))
    result = subprocess.run([sys.executable, "-m", "cluster", "up", "--no-stun", "--listen",
                             f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"), "-certmode=manual",
                             "-hostname", HOST, "-certdir", str(tmp_path / "certs")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "is not valid for server.hostname 'derp.test'" in line
