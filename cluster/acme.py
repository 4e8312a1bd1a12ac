"""certmode letsencrypt: certificates from an ACME CA (Let's Encrypt by default), as derper's autocert.

The supervisor runs one AcmeManager thread; workers never talk to the CA. The flow:

1. Before workers start, `ensure_placeholder` makes sure CERTDIR/HOSTNAME.crt/.key exist: a cached
   certificate from an earlier run, one imported from derper's autocert cache (CERTDIR/HOSTNAME,
   key and chain in one PEM), or else a self-signed placeholder so the TLS port can come up.
2. The manager waits until the DERP port and the plain-HTTP port (server.http_port, if on) answer,
   then orders a certificate with the `acme` package (certbot's client). As autocert, it prefers
   TLS-ALPN-01 and falls back to HTTP-01 (when the plain port is on) with a new order if that
   fails. TLS-ALPN-01: the challenge key and certificate go to RUN_DIR/acme-tls-alpn-01/NAME.pem,
   which every worker's DERP port serves to a ClientHello offering only `acme-tls/1`
   (cluster/tls_alpn.py). HTTP-01: the key authorization goes to RUN_DIR/acme-http-01/TOKEN,
   which every worker's HTTP port serves at /.well-known/acme-challenge/TOKEN (cluster/http_port.py).
3. The new key and chain are written (key first, each atomically) over CERTDIR/HOSTNAME.crt/.key;
   every worker's CertReloader hot-swaps them for new handshakes, no restart.
4. It renews when a third of the lifetime or 30 days (autocert's RenewBefore) is left, whichever is
   sooner; failures retry with backoff, the old certificate keeps serving meanwhile.
5. With -acme-ip-certs (derper v1.102) a second thread orders certificates for the node's IP
   addresses as workers ask for them (cluster/ip_certs.py): RFC 8738 IP identifiers, the
   `shortlived` profile, HTTP-01 only, as derper's ipCertManager. With an IP -hostname it is the
   only thread (there is no DNS name to order).

Python's ssl module cannot choose a certificate on the ALPN protocols offered, so the DERP port
reads the ClientHello itself before TLS starts (cluster/client_hello.py) and picks the context.
The CA validates TLS-ALPN-01 on port 443 and HTTP-01 on port 80 (derper's defaults).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from .config import Config, ConfigError
from .tls_alpn import challenge_dir as tls_alpn_challenge_dir

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("cluster.acme")

#: autocert.Manager.RenewBefore default
RENEW_BEFORE = datetime.timedelta(days=30)
#: autocert's account key file in its DirCache, reused so derper's cert dir keeps its ACME account
ACCOUNT_KEY_FILE = "acme_account+key"
RETRY_MIN, RETRY_MAX = 5.0, 3600.0
CHECK_MAX = 12 * 3600.0
TLS_ALPN_01, HTTP_01 = "tls-alpn-01", "http-01"
#: how often the IP issuer looks for workers' requests; derper's backoff after a failed IP order
IP_POLL = 1.0
IP_RETRY_MIN, IP_RETRY_MAX = 60.0, 1800.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _is_ip(name: str) -> bool:
    from .tls import _is_ip as is_ip

    return is_ip(name)


def challenge_dir(config: Config) -> Path:
    return config.run_path / "acme-http-01"


def preflight(config: Config) -> None:
    """Settings letsencrypt cannot work without, as one line each (the supervisor calls this)."""
    hostname = str(config.values["server.hostname"])
    if not hostname:
        raise ConfigError("server.hostname (--hostname / -hostname / DERP_DOMAIN): certmode letsencrypt needs "
                          "the DNS name to get a certificate for")
    ip_certs = bool(config.values.get("server.acme_ip_certs"))
    if _is_ip(hostname) and not ip_certs:
        raise ConfigError("server.hostname (--hostname): is an IP address; use --certmode manual for a "
                          "self-signed cert, or set --acme-ip-certs for Let's Encrypt IP certs (derper's advice)")
    if ip_certs and int(config.values["server.http_port"]) < 0:
        raise ConfigError("server.http_port (--http-port): --acme-ip-certs answers the CA's HTTP-01 challenge "
                          "there; set it (derper's default is 80)")
    try:
        import acme  # noqa: F401
        import josepy  # noqa: F401
    except ImportError as exc:
        raise ConfigError("server.certmode: letsencrypt needs the 'acme' package (pip install acme)") from exc
    ca_file = config.values["server.acme_ca_file"]
    if ca_file and not Path(ca_file).is_file():
        raise ConfigError(f"server.acme_ca_file (--acme-ca-file): {ca_file} does not exist")
    certdir = Path(config.values["server.certdir"])
    try:
        certdir.mkdir(parents=True, exist_ok=True)
        probe = certdir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"server.certdir (--certdir): certmode letsencrypt caches its certificate there, and "
                          f"{certdir}: {exc.strerror}; pick a writable directory") from exc


# -- files -----------------------------------------------------------------------------------------


def _load_leaf(crt: Path) -> x509.Certificate | None:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(crt.read_bytes())
    except (OSError, ValueError):
        return None


def is_placeholder(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject  # self-signed: ours, never the CA's


def ensure_placeholder(config: Config, crt: Path, key: Path) -> None:
    """Make CERTDIR/NAME.crt/.key exist so workers can serve TLS before the first ACME certificate."""
    from .tls import _locked_generate

    hostname = str(config.values["server.hostname"])

    def missing() -> bool:
        return not (crt.exists() and key.exists())

    if missing():
        _import_autocert_cache(Path(config.values["server.certdir"]) / hostname, crt, key)
    _locked_generate(crt, key, hostname, missing)


def _import_autocert_cache(cached: Path, crt: Path, key: Path) -> None:
    """derper's autocert DirCache keeps HOSTNAME: the private key PEM, then the chain."""
    from .tls import _write_atomic

    try:
        text = cached.read_bytes()
    except OSError:
        return
    marker = b"-----BEGIN CERTIFICATE-----"
    if b"PRIVATE KEY-----" not in text or marker not in text:
        return
    at = text.index(marker)
    key_pem, chain_pem = text[:at], text[at:]
    if b"PRIVATE KEY-----" not in key_pem:
        return
    _write_atomic(key, key_pem.strip() + b"\n", 0o600)
    _write_atomic(crt, chain_pem.strip() + b"\n", 0o644)
    log.info("imported derper's cached certificate %s", cached)


def renew_at(cert: x509.Certificate) -> datetime.datetime:
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - min(RENEW_BEFORE, lifetime / 3)


# -- the manager -----------------------------------------------------------------------------------


class AcmeManager:
    def __init__(self, config: Config) -> None:
        from .tls import manual_cert_paths

        self.config = config
        self.hostname = str(config.values["server.hostname"])
        self.certdir = Path(config.values["server.certdir"])
        self.crt, self.key = manual_cert_paths(config)
        self.challenges = challenge_dir(config)
        self.tls_challenges = tls_alpn_challenge_dir(config.run_path)
        self.directory_url = str(config.values["server.acme_directory"])
        self.email = str(config.values["server.acme_email"])
        self.ca_file = str(config.values["server.acme_ca_file"])
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.ip_certs = bool(config.values.get("server.acme_ip_certs"))
        self.ip_only = _is_ip(self.hostname)  # an IP -hostname: IP certificates only
        self.ip_thread: threading.Thread | None = None
        self.ip_issued = 0
        self.issued = 0
        self.failures = 0
        self.last_error = ""

    def start(self) -> None:
        self.challenges.mkdir(parents=True, exist_ok=True)
        if not self.ip_only:
            self.thread = threading.Thread(target=self._run, name="acme", daemon=True)
            self.thread.start()
        if self.ip_certs:
            self.ip_thread = threading.Thread(target=self._run_ip_certs, name="acme-ip", daemon=True)
            self.ip_thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in (self.thread, self.ip_thread):
            if thread is not None:
                thread.join(5)

    def due(self) -> float:
        """Seconds until the certificate on disk should be replaced (0 = now)."""
        cert = _load_leaf(self.crt)
        if cert is None or is_placeholder(cert):
            return 0.0
        left = (renew_at(cert) - datetime.datetime.now(datetime.UTC)).total_seconds()
        return max(0.0, left)

    def _run(self) -> None:
        backoff = RETRY_MIN
        while not self.stop.is_set():
            wait = self.due()
            if wait > 0:
                self.stop.wait(min(wait, CHECK_MAX))
                continue
            try:
                self._wait_ready()
                self.obtain()
                backoff = RETRY_MIN
            except Exception as exc:  # keep serving the old cert; try again later
                self.failures += 1
                self.last_error = str(exc)
                log.warning("ACME certificate for %s failed (%s); retrying in %.0fs", self.hostname, exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_MAX)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Until the ports the CA will validate on answer: the DERP port (TLS-ALPN-01) and, when
        there is one, the plain-HTTP port (HTTP-01)."""
        host = self.config.listen_addr[0]
        host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
        deadline = time.monotonic() + timeout
        self._wait_port(host, int(self.config.listen_addr[1]), deadline)
        port = int(self.config.values["server.http_port"])
        if port >= 0:
            self._wait_port(host, port, deadline, captive_check=True)

    def _wait_port(self, host: str, port: int, deadline: float, *, captive_check: bool = False) -> None:
        url_host = f"[{host}]" if ":" in host else host
        while not self.stop.is_set():
            try:
                if not captive_check:
                    socket.create_connection((host, port), timeout=1.0).close()
                    return
                if httpx.get(f"http://{url_host}:{port}/generate_204", timeout=1.0, trust_env=False).status_code == 204:
                    return
            except (OSError, httpx.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the port {host}:{port} does not answer, so the CA cannot validate there")
            self.stop.wait(0.2)

    # -- one order ----------------------------------------------------------------------------------

    def _account_key(self, filename: str):  # type: ignore[no-untyped-def]
        import josepy as jose
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from .tls import _write_atomic

        path = self.certdir / filename
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError):
            private = ec.generate_private_key(ec.SECP256R1())
            _write_atomic(path, private.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                                      serialization.NoEncryption()), 0o600)
        if isinstance(private, ec.EllipticCurvePrivateKey):
            return jose.JWKEC(key=private), "ES256"
        return jose.JWKRSA(key=private), "RS256"

    def challenge_types(self) -> list[str]:
        """autocert's order of preference: TLS-ALPN-01 on the DERP port, then HTTP-01 on the plain
        port when there is one; a failed authorization moves on to the next type with a new order."""
        types = [TLS_ALPN_01]
        if int(self.config.values["server.http_port"]) >= 0:
            types.append(HTTP_01)
        return types

    def _client(self, account_file: str):  # type: ignore[no-untyped-def]
        from acme import client, errors, messages
        from josepy import jwa

        jwk, alg = self._account_key(account_file)
        net = client.ClientNetwork(jwk, alg=getattr(jwa, alg), user_agent="derp-cluster",
                                   # requests takes a CA bundle's path there too
                                   verify_ssl=self.ca_file or True)  # type: ignore[arg-type]
        directory = client.ClientV2.get_directory(self.directory_url, net)
        acme_client = client.ClientV2(directory, net=net)
        registration = messages.NewRegistration.from_data(email=self.email or None, terms_of_service_agreed=True)
        try:
            net.account = acme_client.new_account(registration)
        except errors.ConflictError as exc:  # the account exists: use it
            net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        return acme_client, net

    def order_certificate(self, csr_pem: bytes, types: list[str], *, profile: str | None = None,
                          account_file: str = ACCOUNT_KEY_FILE) -> str:
        """One certificate for the CSR's identifiers, answering the first of types the CA offers;
        the full chain PEM."""
        from acme import errors, messages

        _register_tls_alpn01()
        acme_client, net = self._client(account_file)
        remaining = list(types)
        while True:
            order = acme_client.new_order(csr_pem, profile=profile)
            written: list[Path] = []
            try:
                for authz in order.authorizations:
                    if authz.body.status == messages.STATUS_VALID:
                        continue
                    written.append(self._answer(acme_client, net.key, authz, remaining))
                deadline = datetime.datetime.now() + datetime.timedelta(seconds=90)
                return str(acme_client.poll_and_finalize(order, deadline=deadline).fullchain_pem)
            except errors.ValidationError as exc:
                if not remaining:
                    raise
                log.info("ACME challenge for %s failed (%s); trying %s", self.hostname, exc, remaining[0])
            finally:
                for path in written:
                    path.unlink(missing_ok=True)

    def _answer(self, acme_client, account_key, authz, remaining: list[str]) -> Path:  # type: ignore[no-untyped-def]
        """Put up the answer to the first type in remaining that authz offers (consuming the types
        up to it) and tell the CA; the file to remove afterwards."""
        from .tls_alpn import write_challenge

        identifier = str(authz.body.identifier.value)
        offered = {c.chall.typ: c for c in authz.body.challenges}
        while remaining:
            kind = remaining.pop(0)
            chall = offered.get(kind)
            if chall is None:
                continue
            key_authorization = chall.chall.key_authorization(account_key)
            if kind == TLS_ALPN_01:
                path = write_challenge(self.tls_challenges, identifier, key_authorization)
            else:
                path = self.challenges / chall.chall.encode("token")
                path.write_text(key_authorization)
            acme_client.answer_challenge(chall, chall.chall.response(account_key))
            return path
        raise RuntimeError(f"the CA offers none of the challenges we answer for {identifier} "
                           f"(offered: {', '.join(sorted(offered))})")

    def obtain(self) -> None:
        from acme import crypto_util
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from .tls import _write_atomic

        private = ec.generate_private_key(ec.SECP256R1())
        key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        chain = self.order_certificate(crypto_util.make_csr(key_pem, [self.hostname]), self.challenge_types())
        # key first, then the chain: a reader never sees a chain without its key next to it
        _write_atomic(self.key, key_pem, 0o600)
        _write_atomic(self.crt, chain.encode(), 0o644)
        self.issued += 1
        cert = _load_leaf(self.crt)
        log.info("ACME certificate for %s installed (valid until %s); workers pick it up within seconds",
                 self.hostname, cert.not_valid_after_utc if cert is not None else "?")


    # -- -acme-ip-certs -----------------------------------------------------------------------------

    def _run_ip_certs(self) -> None:
        """Order what workers ask for (cluster/ip_certs.py), one address at a time, each with
        derper's backoff after a failure (1 minute, doubling to 30)."""
        from .ip_certs import read_wanted

        retry: dict[IPAddress, tuple[float, float]] = {}  # address -> (not before, next delay)
        while not self.stop.wait(IP_POLL):
            for ip in read_wanted(self.config.run_path):
                not_before, delay = retry.get(ip, (0.0, IP_RETRY_MIN))
                if time.monotonic() < not_before or self.stop.is_set():
                    continue
                try:
                    self.obtain_ip(ip)
                    retry.pop(ip, None)
                except Exception as exc:  # the next request after the backoff tries again
                    self.failures += 1
                    self.last_error = str(exc)
                    log.warning("ACME certificate for IP %s failed (%s); next attempt in %.0fs", ip, exc, delay)
                    retry[ip] = (time.monotonic() + delay, min(delay * 2, IP_RETRY_MAX))

    def obtain_ip(self, ip: IPAddress) -> None:
        """derper's ipCertManager.issue: a still-fresh cached pair is kept, else a short-lived
        certificate for the IP identifier over HTTP-01."""
        from acme import crypto_util
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from .ip_certs import IP_ACCOUNT_KEY_FILE, SHORTLIVED_PROFILE, cert_paths, forget_wanted, needs_renewal
        from .tls import _write_atomic

        crt, key = cert_paths(self.certdir, ip)
        cached = _load_leaf(crt)
        now = datetime.datetime.now(datetime.UTC)
        if cached is not None and not is_placeholder(cached) and cached.not_valid_before_utc <= now and \
                not needs_renewal(cached.not_valid_before_utc, cached.not_valid_after_utc, now):
            forget_wanted(self.config.run_path, ip)
            return
        host = self.config.listen_addr[0]
        host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
        self._wait_port(host, int(self.config.values["server.http_port"]), time.monotonic() + 60,
                        captive_check=True)
        private = ec.generate_private_key(ec.SECP256R1())
        key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        csr = crypto_util.make_csr(key_pem, ipaddrs=[ip])
        chain = self.order_certificate(csr, [HTTP_01], profile=SHORTLIVED_PROFILE, account_file=IP_ACCOUNT_KEY_FILE)
        _write_atomic(key, key_pem, 0o600)
        _write_atomic(crt, chain.encode(), 0o644)
        forget_wanted(self.config.run_path, ip)
        self.ip_issued += 1
        leaf = _load_leaf(crt)
        log.info("ACME certificate for IP %s installed (valid until %s); in the derpMap: "
                 "{\"HostName\": \"%s\"} needs no CertName", ip,
                 leaf.not_valid_after_utc if leaf is not None else "?", ip)


def _register_tls_alpn01() -> None:
    """The acme package (5.x) dropped its tls-alpn-01 classes; without a registered type the CA's
    challenge parses as UnrecognizedChallenge. The response body is `{}` like HTTP-01's."""
    from acme import challenges

    if TLS_ALPN_01 in challenges.Challenge.TYPES:
        return

    @challenges.ChallengeResponse.register
    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        typ = TLS_ALPN_01

    @challenges.Challenge.register
    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        response_cls = TLSALPN01Response
        typ = TLS_ALPN_01

        def validation(self, account_key, **kwargs):  # type: ignore[no-untyped-def]
            return self.key_authorization(account_key)
