"""-acme-ip-certs (derper v1.102): Let's Encrypt certificates for the node's IP addresses.

As derper's ipCertManager: a client that connects by IP address (no SNI, or an IP SNI equal to the
connection's local address) gets a certificate for that local address, so any number of IPv4 and
IPv6 addresses work with no configuration, and a client can never make us ask for an address that
is not ours. Certificates use the CA's short-lived profile (Let's Encrypt requires it for IPs,
about six days), are validated by HTTP-01 on the plain-HTTP port, and are cached in CERTDIR as
derper names them (the address with ':' replaced by '.', then .crt/.key), with the ACME account
in CERTDIR/acme-account.key.

Workers never talk to the CA: a worker that has no current certificate for a local address
writes RUN_DIR/acme-ip-wanted/NAME (the address inside) and refuses that handshake; the
supervisor's issuer (cluster/acme.py) orders it and writes the pair, which workers then load.
derper holds the handshake open while it orders instead; a Tailscale client simply retries.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from pathlib import Path

log = logging.getLogger("cluster.ip_certs")

#: the ACME profile Let's Encrypt requires for IP address certificates
SHORTLIVED_PROFILE = "shortlived"
#: derper's ipCertManager account key, next to autocert's in the cert dir
IP_ACCOUNT_KEY_FILE = "acme-account.key"
#: how often a worker looks at a cached pair again; and at a missing one, which it asks for again
RECHECK = 5.0
RECHECK_MISSING = 1.0


def cert_name(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return str(ip).replace(":", ".")


def cert_paths(certdir: Path, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[Path, Path]:
    name = cert_name(ip)
    return certdir / f"{name}.crt", certdir / f"{name}.key"


def wanted_dir(run_path: Path) -> Path:
    return run_path / "acme-ip-wanted"


def local_ip(sockname: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The connection's local address (IPv4-mapped IPv6 unmapped, as Go's Unmap), or None."""
    if not isinstance(sockname, tuple) or not sockname:
        return None
    try:
        ip = ipaddress.ip_address(str(sockname[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def renew_at(not_before: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    """derper's certNeedsRenewal: from when less than a third of the lifetime is left."""
    return not_after - (not_after - not_before) / 3


def needs_renewal(not_before: datetime.datetime, not_after: datetime.datetime, now: datetime.datetime) -> bool:
    return now >= renew_at(not_before, not_after)


class IpCertContexts:
    """Worker side: the TLS context for each local address, from the pairs the supervisor writes."""

    def __init__(self, certdir: Path, run_path: Path, meta_pem: bytes) -> None:
        self.certdir = certdir
        self.wanted = wanted_dir(run_path)
        self.meta_pem = meta_pem
        # address -> (checked at, the files' signature then, context or None, when to ask for renewal)
        self._cache: dict[ipaddress.IPv4Address | ipaddress.IPv6Address,
                          tuple[float, object, ssl.SSLContext | None, datetime.datetime | None]] = {}

    def context_for(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, now: float) -> ssl.SSLContext | None:
        from .tls import _signature

        checked, seen, ctx, renew = self._cache.get(ip, (-RECHECK, None, None, None))
        if now - checked < (RECHECK if ctx is not None else RECHECK_MISSING):
            return ctx
        files = _signature(cert_paths(self.certdir, ip))
        if ctx is None or files != seen:  # a pair we have not loaded yet
            ctx, renew = self._load(ip)
        if ctx is None or (renew is not None and datetime.datetime.now(datetime.UTC) >= renew):
            self._ask(ip)  # missing, or served meanwhile while the supervisor renews it
        self._cache[ip] = (now, files, ctx, renew)
        return ctx

    def _load(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
              ) -> tuple[ssl.SSLContext | None, datetime.datetime | None]:
        """The context for ip's pair and when to ask for its renewal, or None if it is not usable."""
        from cryptography import x509

        from .acme import is_placeholder
        from .tls import load_chain, new_server_context

        crt, key = cert_paths(self.certdir, ip)
        try:
            leaf = x509.load_pem_x509_certificate(crt.read_bytes())
        except (OSError, ValueError):
            return None, None
        now = datetime.datetime.now(datetime.UTC)
        if is_placeholder(leaf) or not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
            return None, None  # the IP hostname's self-signed placeholder, or not (or no longer) valid
        ctx = new_server_context()
        try:
            load_chain(ctx, crt, key, self.meta_pem)
        except (OSError, ssl.SSLError) as exc:
            log.warning("IP cert %s does not load (%s)", crt, exc)
            return None, None
        return ctx, renew_at(leaf.not_valid_before_utc, leaf.not_valid_after_utc)

    def _ask(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        try:
            self.wanted.mkdir(parents=True, exist_ok=True)
            (self.wanted / cert_name(ip)).write_text(str(ip))
        except OSError as exc:
            log.warning("cannot ask for an IP cert for %s: %s", ip, exc)


def read_wanted(run_path: Path) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Supervisor side: the addresses workers asked for (malformed requests are dropped)."""
    found = []
    try:
        entries = list(wanted_dir(run_path).iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            ip = ipaddress.ip_address(entry.read_text().strip())
        except (OSError, ValueError):
            entry.unlink(missing_ok=True)
            continue
        found.append(ip)
    return found


def forget_wanted(run_path: Path, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    (wanted_dir(run_path) / cert_name(ip)).unlink(missing_ok=True)
