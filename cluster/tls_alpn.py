"""ACME TLS-ALPN-01 (RFC 8737): the challenge certificate, and the DERP port's answer to it.

Supervisor side (cluster/acme.py): `write_challenge` puts the challenge key and certificate for a
name in RUN_DIR/acme-tls-alpn-01/NAME.pem; the acme package (5.x) no longer builds these, so
`challenge_cert_pem` does, as autocert's TLSALPN01ChallengeCert: self-signed, the identifier as its
only subjectAltName, and the critical id-pe-acmeIdentifier extension holding SHA-256 of the key
authorization.

Worker side: a DERP port in certmode letsencrypt reads each connection's ClientHello before TLS
starts (`HelloSniffer`, cluster/client_hello.py). A client offering exactly `acme-tls/1` for the
hostname, while such a file exists, gets a handshake with that certificate and ALPN `acme-tls/1`,
then the connection is closed (RFC 8737 3: nothing else is exchanged). With no pending challenge
it is refused, as autocert refuses it. With -acme-ip-certs a client connecting by IP gets the
certificate of its connection's local address (cluster/ip_certs.py). Every other ClientHello, or
bytes that are not one, go on to the usual TLS context with every byte read, exactly as without
the sniffer.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .client_hello import ClientHello, ClientHelloError, ClientHelloReader
from .ip_certs import IpCertContexts, local_ip

log = logging.getLogger("cluster.tls_alpn")

ACME_TLS_ALPN = "acme-tls/1"
#: id-pe-acmeIdentifier, RFC 8737 6.1
ACME_IDENTIFIER_OID = "1.3.6.1.5.5.7.1.31"


def challenge_dir(run_path: Path) -> Path:
    return run_path / "acme-tls-alpn-01"


def challenge_server_name(identifier: str) -> str:
    """The SNI the CA sends: the name itself, or for an IP its reverse-DNS name (RFC 8738 6)."""
    try:
        return ipaddress.ip_address(identifier).reverse_pointer
    except ValueError:
        return identifier.lower().rstrip(".")


def _file_for(directory: Path, server_name: str) -> Path:
    from .tls import cert_basename

    return directory / f"{cert_basename(server_name)}.pem"


def challenge_cert_pem(identifier: str, key_authorization: str) -> bytes:
    """Key and certificate (PEM, in that order) that answer TLS-ALPN-01 for identifier."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from .tls import _general_name

    private = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    # the extension's value is the DER OCTET STRING of the digest (RFC 8737 3)
    acme_identifier = x509.UnrecognizedExtension(x509.ObjectIdentifier(ACME_IDENTIFIER_OID),
                                                 bytes([0x04, len(digest)]) + digest)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME TLS-ALPN-01 challenge")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([_general_name(identifier)]), critical=False)
        .add_extension(acme_identifier, critical=True)
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def write_challenge(directory: Path, identifier: str, key_authorization: str) -> Path:
    from .tls import _write_atomic

    directory.mkdir(parents=True, exist_ok=True)
    path = _file_for(directory, challenge_server_name(identifier))
    _write_atomic(path, challenge_cert_pem(identifier, key_authorization), 0o600)
    return path


def offers_only_acme_tls(hello: ClientHello) -> bool:
    """autocert's wantsTokenCert: ALPN is exactly [acme-tls/1]."""
    return hello.alpn == (ACME_TLS_ALPN.encode(),)


class TlsStarter(Protocol):
    """What the HTTP protocol offers the sniffer: start TLS on transport with a context, for app,
    replaying the bytes already read."""

    def __call__(self, transport: Any, context: ssl.SSLContext, app: asyncio.BaseProtocol, early: bytes) -> None:
        ...


class HelloRouter:
    """Picks a connection's TLS context from its ClientHello (attached to the DERP context in
    certmode letsencrypt): the TLS-ALPN-01 answer for the names it serves, with -acme-ip-certs the
    certificate of the local address for a client that connects by IP, else the usual context."""

    def __init__(self, directory: Path, identifiers: list[str], ip_certs: IpCertContexts | None = None,
                 *, ip_only: bool = False) -> None:
        self.directory = directory
        self.server_names = frozenset(challenge_server_name(name) for name in identifiers)
        self.ip_certs = ip_certs
        self.ip_only = ip_only  # an IP -hostname: there is no DNS name to serve
        self.answered = 0
        self.refused = 0

    def context_for(self, hello: ClientHello) -> ssl.SSLContext | None:
        """The challenge context for this acme-tls/1 hello, or None (no such challenge pending)."""
        name = (hello.server_name or "").lower().rstrip(".")
        if name not in self.server_names:
            return None
        path = _file_for(self.directory, name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols([ACME_TLS_ALPN])
        ctx.num_tickets = 0  # the validator never resumes
        try:
            ctx.load_cert_chain(str(path))
        except (OSError, ssl.SSLError):
            return None
        return ctx

    def ip_context_for(self, hello: ClientHello, sockname: object) -> ssl.SSLContext | None:
        """With -acme-ip-certs: the certificate of the connection's local address, or None to refuse
        (a DNS name, an IP that is not this connection's, or not issued yet: then it is asked for)."""
        asked = _ip_or_none(hello.server_name) if hello.server_name is not None else None
        local = local_ip(sockname)
        if self.ip_certs is None or local is None or (hello.server_name is not None and asked != local):
            # derper: never a certificate for an address that is not this connection's, and on an
            # IP-only node "this server only serves IP address certificates"
            return None
        return self.ip_certs.context_for(local, time.monotonic())

    def intercept(self, transport: Any, loop: asyncio.AbstractEventLoop, *, default: ssl.SSLContext,
                  app: asyncio.BaseProtocol, start_tls: TlsStarter, timeout: float) -> None:
        """Read the ClientHello on transport, then start TLS with the right context."""
        def decided(hello: ClientHello | None, early: bytes) -> None:
            if hello is None:
                start_tls(transport, default, app, early)
                return
            if offers_only_acme_tls(hello):
                ctx = self.context_for(hello)
                if ctx is None:
                    # autocert: "no token cert" fails the handshake; the relay is not for acme-tls/1
                    self.refused += 1
                    transport.close()
                    return
                self.answered += 1
                log.info("answering TLS-ALPN-01 for %s", hello.server_name)
                start_tls(transport, ctx, _CloseAfterHandshake(), early)
                return
            by_ip = hello.server_name is None or _ip_or_none(hello.server_name) is not None
            if self.ip_certs is not None and (by_ip or self.ip_only):
                ctx = self.ip_context_for(hello, transport.get_extra_info("sockname"))
                if ctx is None:
                    transport.close()  # not ours, or not issued yet (asked for): the client retries
                    return
                start_tls(transport, ctx, app, early)
                return
            start_tls(transport, default, app, early)

        sniffer = HelloSniffer(decided, loop, timeout)
        transport.set_protocol(sniffer)
        sniffer.connection_made(transport)


def _ip_or_none(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class _CloseAfterHandshake(asyncio.Protocol):
    """The application side of a TLS-ALPN-01 handshake: once it is done, close (RFC 8737 3)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


class HelloSniffer(asyncio.Protocol):
    """Reads a connection's ClientHello, then calls decided(hello, bytes read) once: hello is None
    when the bytes are not a ClientHello (the TLS protocol then refuses them as it always did)."""

    def __init__(self, decided: Callable[[ClientHello | None, bytes], None], loop: asyncio.AbstractEventLoop,
                 timeout: float) -> None:
        self.decided = decided
        self.loop = loop
        self.timeout = timeout
        self.reader = ClientHelloReader()
        self.buffer = bytearray()
        self.transport: Any = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # the handshake's deadline (derper's ReadTimeout) also bounds a client that sends nothing
        self._deadline = self.loop.call_later(self.timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            hello = self.reader.feed(data)
        except ClientHelloError:
            self._decide(None)
            return
        if hello is not None:
            self._decide(hello)

    def _decide(self, hello: ClientHello | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        early, self.buffer = bytes(self.buffer), bytearray()
        self.decided(hello, early)

    def eof_received(self) -> bool:
        return False  # closed before a whole ClientHello: nothing to answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

