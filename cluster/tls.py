"""TLS for the DERP port: the cert modes of `server.certmode`, and hot reload of renewed certs.

- dev: plain HTTP (no context).
- manual: exactly CERTDIR/HOSTNAME.crt and CERTDIR/HOSTNAME.key, derper's naming rule (characters
  outside [a-zA-Z0-9-.] dropped, so 2001:db8::1 -> 2001db81.crt), so an operator moving from derper
  keeps the same cert directory. As derper: an IP hostname with no files gets a self-signed cert
  written there (1 year, DigitalSignature|KeyEncipherment); the cert must cover the hostname; a DNS
  hostname is served only to that SNI. We also refuse an expired cert for a DNS hostname at start.
- selfsigned: a certificate generated once into STATE_DIR/tls/ and reused on every restart, so the
  `sha256-raw:<hex>` pin pasted into the derpMap (DERPNode.CertName) stays valid. Tailscale clients
  check that pin instead of a CA chain (and not the dates), which is how IP-only relays work.
- letsencrypt: ACME (cluster/acme.py, run by the supervisor) writes CERTDIR/HOSTNAME.crt/.key;
  until the first certificate arrives workers serve a placeholder, then hot-swap. The DERP port
  also answers TLS-ALPN-01 (cluster/tls_alpn.py): the context carries a `derp_hello_router` that
  the HTTP protocol asks to read the ClientHello before TLS starts.

Every context also carries derper's meta certificate (CN derpkey<hex server key>, serial = protocol
version) after the chain, so Go clients learn the server key from the TLS handshake and use fast
start (derpserver.go initMetacert, derphttp parseMetaCert).

Workers call `build_ssl_context` and run a `CertReloader`; the supervisor calls `check_tls_config`
first so a bad cert setup fails at start with one line instead of N crashing workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import ssl
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, ConfigError

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("cluster.tls")

#: how often CertReloader looks at the files; renewals are rare, a stat pair is cheap
RELOAD_INTERVAL = 5.0
#: a self-signed cert lives this long; Tailscale checks only the pin, never the dates, but other
#: clients (curl -k, browsers) show them, so keep them sane and renew well before the end
#: one year, as derper's createSelfSignedIPCert ("a bit over that is rejected by macOS etc"). Not
#: renewed on expiry: Tailscale checks the pin only, and a new cert would break the pin.
SELFSIGNED_VALIDITY_DAYS = 365
#: derper's unsafeHostnameCharacters: what is dropped from the hostname to name the cert files
_UNSAFE_NAME = re.compile(r"[^a-zA-Z0-9\-.]")
#: derp.ProtocolVersion, the meta certificate's serial number
META_CERT_SERIAL = 2
META_CERT_CN_PREFIX = "derpkey"


@dataclass(frozen=True)
class CertFiles:
    crt: Path
    key: Path
    pin: str = ""  # sha256-raw:<hex> for selfsigned certs, "" otherwise


def cert_basename(hostname: str) -> str:
    """derper's file name for a hostname's cert: unsafe characters dropped."""
    return _UNSAFE_NAME.sub("", hostname)


def manual_cert_paths(config: Config) -> tuple[Path, Path]:
    """The only two files certmode manual (and letsencrypt) use: CERTDIR/NAME.crt and CERTDIR/NAME.key."""
    certdir = Path(config.values["server.certdir"])
    name = cert_basename(config.values["server.hostname"])
    return certdir / f"{name}.crt", certdir / f"{name}.key"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def cert_pin(crt: Path | str) -> str:
    """derpMap CertName pin of a PEM cert: sha256 over the DER bytes of the leaf, as tlsdial checks it."""
    pem = Path(crt).read_text()
    der = ssl.PEM_cert_to_DER_cert(pem[pem.index("-----BEGIN CERTIFICATE-----"):])
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()


def new_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # DERP is HTTP/1.1 (upgrade or WebSocket); announcing h2 would make browsers pick a protocol
    # uvicorn does not speak.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _load_pair(ctx: ssl.SSLContext, crt: Path, key: Path, setting: str, meta_pem: bytes = b"") -> None:
    for path in (crt, key):  # name the file that is actually unreadable
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    try:
        load_chain(ctx, crt, key, meta_pem)
    except ssl.SSLError as exc:
        raise ConfigError(f"{setting}: cannot load {crt} with {key}: {exc.reason or exc} "
                          "(want PEM cert chain + matching PEM private key)") from exc
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {exc.filename or crt}: {exc.strerror}") from exc


def load_chain(ctx: ssl.SSLContext, crt: Path, key: Path, meta_pem: bytes = b"") -> None:
    """Load crt (leaf + chain) and key into ctx, with the meta certificate after the chain."""
    if not meta_pem:
        ctx.load_cert_chain(str(crt), str(key))
        return
    chain = Path(crt).read_bytes()
    # load_cert_chain reads files only; the combined chain holds no secret (the key stays in its file)
    with tempfile.NamedTemporaryFile(prefix="derp-chain-", suffix=".pem") as tmp:
        tmp.write(chain.rstrip(b"\n") + b"\n" + meta_pem)
        tmp.flush()
        ctx.load_cert_chain(tmp.name, str(key))


def meta_cert_pem(server_public: bytes) -> bytes:
    """derper's meta certificate: self-signed (Ed25519), CN derpkey<hex of the server key>, serial =
    protocol version, valid 30 days either side of now, BasicConstraints set (macOS wants it)."""
    _need_cryptography()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    private = ed25519.Ed25519PrivateKey.generate()
    # 71 characters: over RFC 5280's 64 for a CN, which Go does not enforce and clients never check
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cn = x509.NameAttribute(NameOID.COMMON_NAME, META_CERT_CN_PREFIX + server_public.hex(), _validate=False)
    name = x509.Name([cn])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(META_CERT_SERIAL)
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _server_public(config: Config) -> bytes:
    from relay_worker.keys import load_or_create_server_key

    return load_or_create_server_key(config.server_key_path).public().raw


def resolve_cert_files(config: Config) -> CertFiles | None:
    """Which files the workers serve (generating the self-signed pair if needed); None for dev."""
    mode = config.values["server.certmode"]
    if mode == "dev":
        return None
    if mode == "manual":
        crt, key = manual_cert_paths(config)
        hostname = str(config.values["server.hostname"])
        if not (crt.exists() and key.exists()) and _is_ip(hostname):
            # derper: an IP hostname without cert files gets a self-signed cert written there
            _locked_generate(crt, key, hostname, lambda: not (crt.exists() and key.exists()))
        elif not (crt.exists() and key.exists()):
            raise ConfigError(
                f"server.certdir: certmode manual needs {crt} and {key} "
                "(files must be named exactly <hostname>.crt/.key)")
        return CertFiles(crt, key)
    if mode == "selfsigned":
        return ensure_selfsigned(config)
    if mode == "letsencrypt":
        from .acme import ensure_placeholder

        crt, key = manual_cert_paths(config)
        ensure_placeholder(config, crt, key)
        return CertFiles(crt, key)
    raise ConfigError(f"server.certmode: unknown mode {mode!r}")  # load_config rejects it first


def _sni_names(config: Config) -> str | None:
    """The one SNI the DERP port answers (derper's manual and autocert managers), or None for any."""
    hostname = str(config.values["server.hostname"])
    if config.values["server.certmode"] in ("manual", "letsencrypt") and hostname and not _is_ip(hostname):
        return hostname.lower()
    return None


def build_ssl_context(config: Config, server_public: bytes | None = None) -> ssl.SSLContext | None:
    """The server context for the DERP port, or None for certmode dev (plain HTTP)."""
    files = resolve_cert_files(config)
    if files is None:
        return None
    ctx = new_server_context()
    meta = meta_cert_pem(server_public if server_public is not None else _server_public(config))
    _load_pair(ctx, files.crt, files.key, "server.certdir" if files.pin == "" else "server.state_dir", meta)
    ctx.derp_meta_pem = meta  # type: ignore[attr-defined]  # CertReloader keeps it across reloads
    only = _sni_names(config)
    if only is not None:
        def check_sni(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
            # derper: "cert mismatch with hostname" for any other name, and for no SNI at all
            if (server_name or "").lower() != only:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        ctx.sni_callback = check_sni
    if config.values["server.certmode"] == "letsencrypt":
        from .ip_certs import IpCertContexts
        from .tls_alpn import HelloRouter, challenge_dir

        # the DERP port answers the CA's TLS-ALPN-01 itself, and with -acme-ip-certs serves each
        # local address its own certificate: both pick the context on the ClientHello
        hostname = str(config.values["server.hostname"])
        ip_certs = IpCertContexts(Path(config.values["server.certdir"]), config.run_path, meta) \
            if config.values.get("server.acme_ip_certs") else None
        ctx.derp_hello_router = HelloRouter(  # type: ignore[attr-defined]
            challenge_dir(config.run_path), [hostname], ip_certs, ip_only=_is_ip(hostname))
    return ctx


def check_tls_config(config: Config) -> str | None:
    """Run by the supervisor before it starts workers: raise ConfigError (one line) if the cert
    setup cannot work; return a line worth printing (the selfsigned pin), or None."""
    if config.values.get("server.acme_ip_certs") and config.values["server.certmode"] != "letsencrypt":
        raise ConfigError("server.acme_ip_certs (--acme-ip-certs): requires certmode letsencrypt (as derper); "
                          "drop it or set --certmode letsencrypt")
    files = resolve_cert_files(config)
    if files is None:
        return None
    setting = "server.certdir" if files.pin == "" else "server.state_dir"
    _load_pair(new_server_context(), files.crt, files.key, setting)
    hostname = str(config.values["server.hostname"])
    mode = config.values["server.certmode"]
    if mode == "manual":
        _check_covers(files.crt, hostname, check_expiry=not _is_ip(hostname))
        if _is_ip(hostname):
            return (f"TLS cert {files.crt} for IP {hostname}; put \"CertName\": \"{cert_pin(files.crt)}\" in "
                    "this node's derpMap entry (clients check that pin instead of a CA)")
    if files.pin:
        return (f"self-signed TLS cert {files.crt}; put \"CertName\": \"{files.pin}\" in this node's "
                "derpMap entry (clients check that pin instead of a CA)")
    return None


def _check_covers(crt: Path, hostname: str, *, check_expiry: bool) -> None:
    """derper's VerifyHostname at start (SANs only, as Go since 1.15), and for CA-checked names the dates."""
    _need_cryptography()
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"server.certdir: {crt} is not a PEM certificate: {exc}") from exc
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    if not cert_covers(sans, hostname):
        names = [str(n.value) for n in sans] or ["no subjectAltName"]
        raise ConfigError(f"server.certdir: {crt} is not valid for server.hostname {hostname!r} (it covers "
                          f"{', '.join(names)}); install a cert for {hostname} or fix --hostname")
    if check_expiry:
        now = datetime.datetime.now(datetime.UTC)
        if cert.not_valid_after_utc <= now:
            raise ConfigError(f"server.certdir: {crt} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                              "install a renewed certificate")
        if cert.not_valid_before_utc > now:
            raise ConfigError(f"server.certdir: {crt} is not valid before "
                              f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this host's clock")


def cert_covers(sans: x509.SubjectAlternativeName, hostname: str) -> bool:
    from cryptography import x509

    if _is_ip(hostname):
        wanted = ipaddress.ip_address(hostname)
        return any(ip == wanted for ip in sans.get_values_for_type(x509.IPAddress))
    host = hostname.lower().rstrip(".")
    for pattern in (name.lower().rstrip(".") for name in sans.get_values_for_type(x509.DNSName)):
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host and host.split(".", 1)[1] == pattern[2:] and \
                host.split(".", 1)[0]:
            return True
    return False


# -- selfsigned ------------------------------------------------------------------------------------


def selfsigned_name(config: Config) -> str:
    """The name the generated cert is for: the hostname (DNS name or IP), else the listen IP."""
    hostname = config.values["server.hostname"]
    if hostname:
        return str(hostname)
    host = config.listen_addr[0]
    return host if host not in ("", "0.0.0.0", "::") else "localhost"


def selfsigned_paths(config: Config) -> tuple[Path, Path]:
    tls_dir = config.state_path / "tls"
    return tls_dir / "selfsigned.crt", tls_dir / "selfsigned.key"


def ensure_selfsigned(config: Config) -> CertFiles:
    """Reuse STATE_DIR/tls/selfsigned.{crt,key} if it is for this name and not near expiry, else
    generate it. Locked, so N workers starting at once agree on one cert (and one pin)."""
    crt, key = selfsigned_paths(config)
    name = selfsigned_name(config)
    _locked_generate(crt, key, name, lambda: not _selfsigned_usable(crt, key, name), setting="server.state_dir")
    return CertFiles(crt, key, cert_pin(crt))


def _locked_generate(crt: Path, key: Path, name: str, needed: Callable[[], bool],
                     setting: str = "server.certdir") -> None:
    """Generate the self-signed pair under a lock if needed(), so N workers agree on one cert."""
    try:
        crt.parent.mkdir(parents=True, exist_ok=True)
        with open(crt.parent / f".{crt.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if needed():
                _generate_selfsigned(crt, key, name)
                log.info("generated self-signed TLS cert for %s in %s", name, crt)
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot write the self-signed cert {crt}: {exc.strerror}") from exc


def _need_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:  # imported lazily: only this mode needs it
        raise ConfigError("server.certmode: selfsigned needs the 'cryptography' package "
                          "(pip install cryptography), or use certmode manual") from exc


def _selfsigned_usable(crt: Path, key: Path, name: str) -> bool:
    if not (crt.is_file() and key.is_file()):
        return False
    _need_cryptography()
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    # Reused whatever its dates: Tailscale checks only the pin, and a new cert would change it.
    return _general_name(name) in list(sans)


def _general_name(name: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _generate_selfsigned(crt: Path, key: Path, name: str) -> None:
    _need_cryptography()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    # P-256: every Tailscale client speaks it and handshakes are cheaper than RSA's.
    private = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clients with a slow clock
        .not_valid_after(now + datetime.timedelta(days=SELFSIGNED_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    # Key first, then cert, each replaced atomically: a reader never sees a half-written file, and
    # a cert on disk always has its key already next to it.
    _write_atomic(key, key_pem, 0o600)
    _write_atomic(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- reload ----------------------------------------------------------------------------------------


def _signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int, int], ...] | None:
    # os.stat follows symlinks, so a Kubernetes Secret volume (files are symlinks through ..data,
    # swapped atomically on update) shows up as a new inode.
    try:
        return tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))
    except OSError:
        return None


class CertReloader:
    """Watch crt/key and load them into the live context when they change, so new TLS handshakes
    get the renewed cert without a restart (connections already up keep theirs)."""

    def __init__(self, context: ssl.SSLContext, crt: Path | str, key: Path | str,
                 interval: float = RELOAD_INTERVAL, meta_pem: bytes | None = None) -> None:
        self.context = context
        self.meta_pem = getattr(context, "derp_meta_pem", b"") if meta_pem is None else meta_pem
        self.crt = Path(crt)
        self.key = Path(key)
        self.interval = interval
        self.reloads = 0
        self.failures = 0
        self._seen = _signature((self.crt, self.key))
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_config(cls, context: ssl.SSLContext | None, config: Config,
                   interval: float = RELOAD_INTERVAL) -> CertReloader | None:
        """A started reloader for the files build_ssl_context loaded, or None in dev mode."""
        files = resolve_cert_files(config)
        if context is None or files is None:
            return None
        reloader = cls(context, files.crt, files.key, interval)
        reloader.start()
        return reloader

    def check(self) -> bool:
        """Reload if the files changed; True when a new cert was loaded."""
        seen = _signature((self.crt, self.key))
        if seen is None or seen == self._seen:
            return False  # unchanged, or mid-renewal with a file briefly missing: look again later
        # Try the pair on a scratch context first: a renewal writes crt and key one after the
        # other, and loading a mismatched pair into the live context could leave it unusable.
        try:
            new_server_context().load_cert_chain(str(self.crt), str(self.key))
            load_chain(self.context, self.crt, self.key, self.meta_pem)
        except (ssl.SSLError, OSError) as exc:
            self.failures += 1
            log.warning("TLS cert %s changed but does not load yet (%s); keeping the old one", self.crt, exc)
            return False  # _seen is left alone so the next tick tries again
        self._seen = seen
        self.reloads += 1
        log.info("reloaded TLS cert %s", self.crt)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # the watcher must outlive a surprise; the old cert keeps serving
                log.exception("TLS cert reload check failed")

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="cert-reloader")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
