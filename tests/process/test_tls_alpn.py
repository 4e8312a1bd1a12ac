"""The context choice on the ClientHello (cluster/tls_alpn.py, cluster/ip_certs.py), without a CA:
the TLS-ALPN-01 certificate as RFC 8737 has it, and -acme-ip-certs' rule that a client gets a
certificate only for the local address of its own connection. Against pebble: tests/process/test_acme.py."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.client_hello import ClientHello
from cluster.ip_certs import IpCertContexts, cert_paths, read_wanted
from cluster.tls_alpn import ACME_IDENTIFIER_OID, HelloRouter, challenge_cert_pem, write_challenge
from tests.support import ClusterProcess, free_port


def test_the_challenge_certificate_carries_the_key_authorization_digest() -> None:
    pem = challenge_cert_pem("derp.example.com", "token.thumbprint")
    cert = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE-----"):])
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(ACME_IDENTIFIER_OID))
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["derp.example.com"]
    ip_pem = challenge_cert_pem("192.0.2.7", "k.a")
    ip_cert = x509.load_pem_x509_certificate(ip_pem[ip_pem.index(b"-----BEGIN CERTIFICATE-----"):])
    assert ip_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]


def test_a_challenge_is_served_only_for_our_name_while_pending(tmp_path: Path) -> None:
    router = HelloRouter(tmp_path, ["Derp.Example.com"])
    hello = ClientHello("derp.example.com", (b"acme-tls/1",))
    assert router.context_for(hello) is None  # nothing pending
    path = write_challenge(tmp_path, "derp.example.com", "token.thumbprint")
    assert path.stat().st_mode & 0o077 == 0
    assert isinstance(router.context_for(hello), ssl.SSLContext)
    assert router.context_for(ClientHello("other.example.com", (b"acme-tls/1",))) is None
    # an IP identifier is validated with its reverse-DNS name as SNI (RFC 8738 6)
    ip_router = HelloRouter(tmp_path, ["192.0.2.7"])
    write_challenge(tmp_path, "192.0.2.7", "t.k")
    assert isinstance(ip_router.context_for(ClientHello("7.2.0.192.in-addr.arpa", (b"acme-tls/1",))), ssl.SSLContext)


def _issue(certdir: Path, ip: str) -> None:
    """A pair for ip signed by a throwaway CA (not self-signed: a placeholder is never served)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=True)
            .sign(ca_key, hashes.SHA256()))
    crt, key_path = cert_paths(certdir, ipaddress.ip_address(ip))
    certdir.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    crt.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))


def test_ip_certs_only_for_the_connections_own_address(tmp_path: Path) -> None:
    certdir, run = tmp_path / "certs", tmp_path / "run"
    contexts = IpCertContexts(certdir, run, b"")
    router = HelloRouter(tmp_path / "alpn", ["198.51.100.1"], contexts, ip_only=True)
    local = ("127.0.0.1", 443)
    assert router.ip_context_for(ClientHello(None, ()), local) is None  # not issued yet: asked for
    assert read_wanted(run) == [ipaddress.ip_address("127.0.0.1")]
    _issue(certdir, "127.0.0.1")
    contexts._cache.clear()  # what RECHECK_MISSING seconds later would do
    assert isinstance(router.ip_context_for(ClientHello(None, ()), local), ssl.SSLContext)
    assert isinstance(router.ip_context_for(ClientHello("127.0.0.1", ()), ("::ffff:127.0.0.1", 443, 0, 0)),
                      ssl.SSLContext)
    # an address that is not this connection's, and on an IP-only node any DNS name: refused
    assert router.ip_context_for(ClientHello("127.0.0.2", ()), local) is None
    assert router.ip_context_for(ClientHello("derp.example.com", ()), local) is None
    # IPv6 file names as derper's: colons become dots
    assert cert_paths(certdir, ipaddress.ip_address("2001:db8::1"))[0].name == "2001.db8..1.crt"


# -- on a running node: the sniffer in front of the real TLS protocol ------------------------------


def _tls_client(alpn: list[str] | None) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(incoming, outgoing, server_hostname="localhost"), incoming, outgoing


def _handshake_over(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                    first_flight: bytes) -> None:
    """Finish a handshake whose first flight the caller already sent (in whatever records)."""
    sock.sendall(first_flight)
    while True:
        try:
            tls.do_handshake()
            sock.sendall(outgoing.read())
            return
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake") from None
            incoming.write(data)


def _records(wire: bytes, size: int) -> bytes:
    message = wire[5:5 + int.from_bytes(wire[3:5], "big")]
    out = b""
    for at in range(0, len(message), size):
        chunk = message[at:at + size]
        out += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    return out + wire[5 + len(message):]


def _closed(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.fixture(scope="module")
def letsencrypt_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    """certmode letsencrypt with a CA nobody answers for: the port serves its placeholder, through
    the ClientHello sniffer."""
    certdir = tmp_path_factory.mktemp("certs")
    node = ClusterProcess("--certmode", "letsencrypt", "--hostname", "localhost", "--certdir", str(certdir),
                          "--acme-directory", f"https://127.0.0.1:{free_port()}/dir", "--http-read-timeout", "1",
                          workers=1)
    with node:
        yield node


@pytest.mark.parametrize("record_size", [None, 1, 100])
def test_a_client_hello_in_any_records_reaches_the_tls_protocol_whole(letsencrypt_node: ClusterProcess,
                                                                      record_size: int | None) -> None:
    tls, incoming, outgoing = _tls_client(["http/1.1"])
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    first = outgoing.read()
    with socket.create_connection(("127.0.0.1", letsencrypt_node.port), timeout=10) as sock:
        _handshake_over(sock, tls, incoming, outgoing, first if record_size is None else _records(first, record_size))
        assert tls.selected_alpn_protocol() == "http/1.1"
        tls.write(b"GET /generate_204 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            assert data, "closed before the answer"
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                answer += tls.read(65536)
        assert answer.startswith(b"HTTP/1.1 204")


def test_acme_tls_with_nothing_pending_and_garbage_and_silence_are_closed(letsencrypt_node: ClusterProcess) -> None:
    tls, incoming, outgoing = _tls_client(["acme-tls/1"])
    with socket.create_connection(("127.0.0.1", letsencrypt_node.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        with pytest.raises(ConnectionError):
            _handshake_over(sock, tls, incoming, outgoing, outgoing.read())
    with socket.create_connection(("127.0.0.1", letsencrypt_node.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not TLS: the TLS protocol refuses it, as before
        assert _closed(sock)
    with socket.create_connection(("127.0.0.1", letsencrypt_node.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # half a ClientHello, then nothing: the read timeout ends it
        assert _closed(sock)
