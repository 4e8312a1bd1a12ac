"""Certificates: what a server's certificate says (names, dates, hash) and the client TLS context."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass

from .model import Target, is_ip

# The standard library verifies chains but only describes a certificate it has verified; with a
# `sha256-raw:` pin or InsecureForTests we still want its names and dates, so cryptography reads them.


@dataclass
class CertInfo:
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: list[str]
    ip_addresses: list[str]
    common_name: str
    sha256: str


def parse_certificate(der: bytes) -> CertInfo:
    """Validity, subjectAltName DNS/IP entries and CN of an X.509 certificate. Raises ValueError."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        dns_names, ips = [], []
    except x509.DuplicateExtension as exc:
        raise ValueError(f"certificate has two {exc.oid.dotted_string} extensions") from exc
    else:
        dns_names = list(san.get_values_for_type(x509.DNSName))
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = common_names[-1].value if common_names else ""
    if isinstance(common_name, bytes):
        common_name = common_name.decode("utf-8", "replace")
    return CertInfo(cert.not_valid_before_utc, cert.not_valid_after_utc, dns_names, ips, common_name,
                    hashlib.sha256(der).hexdigest())


def name_matches(cert: CertInfo, name: str) -> bool:
    """Go's rules (crypto/x509 VerifyHostname): subjectAltName only, one-label leading wildcard."""
    if is_ip(name):
        return ipaddress.ip_address(name) in {ipaddress.ip_address(ip) for ip in cert.ip_addresses}
    want = name.lower().rstrip(".")
    for pattern in (n.lower().rstrip(".") for n in cert.dns_names):
        if pattern == want:
            return True
        if pattern.startswith("*.") and "." in want:
            label, _, rest = want.partition(".")
            if label and rest == pattern[2:]:
                return True
    return False


def client_ssl_context(target: Target, ca_file: str | None = None) -> ssl.SSLContext | None:
    """The context the DERP and /derp/probe connections use, mirroring Tailscale's derphttp client."""
    if not target.tls:
        return None
    if target.insecure or target.pin:
        # A pin replaces CA validation (the TLS check compares the hash); InsecureForTests skips it.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cafile=ca_file)
    # With a CertName the certificate is checked against that name, not the host dialled; the TLS check
    # does that match, so OpenSSL only verifies the chain here.
    ctx.check_hostname = not target.cert_name
    return ctx
