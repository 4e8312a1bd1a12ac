"""`cluster probe`: check that DERP nodes really relay, not just that their STUN port answers.

`tailscale netcheck` only measures STUN, so a region can look healthy while its DERP port refuses
every client (wrong proxy, closed firewall port, plain HTTP behind an https URL). For each node this
runs, concurrently and each under its own deadline:

  stun   a STUN Binding round trip (latency, the address the node sees us at)
  tls    for https: certificate name (HostName, CertName, or a `sha256-raw:` pin), expiry, chain
  probe  GET /derp/probe, expecting 200
  derp   two throwaway keys connect as probers and one relays a timestamped packet to the other

and, for regions with several nodes, a cross-node check per ordered pair (client on X sends to a
client on Y), which only passes when the nodes mesh. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import http
import ipaddress
import json
import os
import ssl
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from relay_worker.client import DerpClient

DEFAULT_STUN_PORT = 3478
DEFAULT_TIMEOUT = 5.0
#: certificates closer than this to expiry are reported as a warning (exit status stays 0)
WARN_DAYS = 14
#: timed packets sent after the first delivery; the median is reported
SAMPLES = 3
#: how often an undelivered probe packet is re-sent: the receiver may not be registered yet (derper
#: registers a client just after sending ServerInfo) or, across nodes, not yet known to the mesh
RESEND_INTERVAL = 0.1
LABELS = {"stun": "STUN", "tls": "TLS", "probe": "/derp/probe", "derp": "DERP"}


# -- what to probe ---------------------------------------------------------------------------------


@dataclass
class Target:
    """One DERP node as the prober dials it."""

    name: str
    host_name: str  # TLS ClientHello name and Host header
    dial_host: str  # IPv4/IPv6 from the map when given, else the host name
    derp_port: int
    tls: bool
    region_id: int | None = None
    region_code: str = ""
    derp_path: str = "/derp"
    cert_name: str = ""  # expected certificate name, or "sha256-raw:<hex>" pin
    insecure: bool = False  # InsecureForTests / --insecure: report, do not verify
    stun_host: str = ""
    stun_port: int = DEFAULT_STUN_PORT  # -1 = no STUN on this node
    stun_only: bool = False

    @property
    def address(self) -> str:
        return _join_hostport(self.dial_host, self.derp_port)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}{self.derp_path}"

    @property
    def pin(self) -> str:
        return self.cert_name.removeprefix("sha256-raw:").lower() if self.cert_name.startswith("sha256-raw:") else ""


@dataclass
class Check:
    name: str  # stun | tls | probe | derp
    status: str  # ok | warn | fail | skip
    detail: str = ""
    latency_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass
class NodeReport:
    target: Target
    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return not any(check.failed for check in self.checks.values())

    def summary(self) -> str:
        """e.g. "STUN ok, DERP port refused the upgrade: 426 Upgrade Required" (skipped checks left out)."""
        # One TLS or connect problem fails TLS, /derp/probe and DERP alike: say it once, naming all.
        parts: list[tuple[list[str], str]] = []
        for name in ("stun", "tls", "probe", "derp"):
            check = self.checks.get(name)
            if check is None or check.status == "skip":
                continue
            detail = "ok" if check.status == "ok" else check.detail
            same = next((labels for labels, seen in parts if seen == detail and detail != "ok"), None)
            if same is not None:
                same.append(LABELS[name])
            else:
                parts.append(([LABELS[name]], detail))
        phrases = []
        for labels, detail in parts:
            who = labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"
            # "TLS handshake failed", not "TLS TLS handshake failed"
            phrases.append(detail if len(labels) == 1 and detail.startswith(labels[0] + " ") else f"{who} {detail}")
        return ", ".join(phrases)


@dataclass
class MeshReport:
    region_id: int | None
    src: str
    dst: str
    status: str
    detail: str = ""
    latency_ms: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass
class ProbeOptions:
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    warn_days: int = WARN_DAYS
    samples: int = SAMPLES
    #: derper's mesh key (64 hex), as derpprobe -mesh-psk-file: nodes that verify clients admit the
    #: probe's throwaway keys only when they present it, as they do mesh peers
    mesh_key: str = ""


class ProbeUsageError(Exception):
    """Bad arguments or an unreadable derpMap; the CLI exits 2."""


def _join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(text: str, version: int | None = None) -> bool:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or addr.version == version


def target_from_url(url: str, *, stun_port: int = DEFAULT_STUN_PORT, insecure: bool = False,
                    cert_name: str = "") -> Target:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https"):
        raise ProbeUsageError(f"{url}: want an http:// or https:// DERP URL")
    if not parts.hostname:
        raise ProbeUsageError(f"{url}: no host in the URL")
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError as exc:
        raise ProbeUsageError(f"{url}: {exc}") from None
    host = parts.hostname
    return Target(name=_join_hostport(host, port), host_name=host, dial_host=host, derp_port=port, tls=tls,
                  derp_path=parts.path if parts.path not in ("", "/") else "/derp", cert_name=cert_name,
                  insecure=insecure, stun_host=host, stun_port=stun_port)


# tailcfg field names; Go's encoding/json matches keys case-insensitively and headscale's YAML uses the
# lower-cased names, so one folding table reads the policy-file JSON and headscale's file alike.
_MAP_FIELDS = {"regions": "Regions", "omitdefaultregions": "omitDefaultRegions", "homeparams": "HomeParams"}
_REGION_FIELDS = {name.lower(): name for name in (
    "RegionID", "RegionCode", "RegionName", "Latitude", "Longitude", "Avoid", "NoMeasureNoHome", "Nodes")}
_NODE_FIELDS = {name.lower(): name for name in (
    "Name", "RegionID", "HostName", "CertName", "IPv4", "IPv6", "STUNPort", "STUNOnly", "DERPPort",
    "InsecureForTests", "STUNTestIP", "CanPort80")}


def _fold(doc: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names.get(str(key).lower(), key): value for key, value in doc.items()}


def load_derpmap(path: str | Path) -> dict[str, Any]:
    """A derpMap from `cluster derpmap` JSON, a policy file's {"derpMap": ...}, or headscale's YAML."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ProbeUsageError(f"--derpmap {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as json_error:
        try:
            import yaml  # optional: only needed for headscale's YAML files
        except ImportError:
            raise ProbeUsageError(f"--derpmap {path}: not JSON ({json_error}); YAML needs PyYAML") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ProbeUsageError(f"--derpmap {path}: neither JSON nor YAML: {exc}") from None
    if isinstance(doc, dict):
        for key in list(doc):
            if str(key).lower() == "derpmap" and isinstance(doc[key], dict):
                doc = doc[key]
                break
    if not isinstance(doc, dict) or not isinstance(_fold(doc, _MAP_FIELDS).get("Regions"), dict):
        raise ProbeUsageError(f"--derpmap {path}: no Regions map (want the output of `cluster derpmap`)")
    return doc


def targets_from_derpmap(doc: dict[str, Any], *, plain_http: bool = False,
                         insecure: bool = False) -> list[Target]:
    """Targets for every node, in region order. Raises ProbeUsageError on a malformed map."""
    regions = _fold(doc, _MAP_FIELDS)["Regions"]
    targets: list[Target] = []
    for key in sorted(regions, key=lambda k: int(k) if str(k).lstrip("-").isdigit() else 0):
        if regions[key] is None:  # headscale's "1: null" removes a region
            continue
        if not isinstance(regions[key], dict):
            raise ProbeUsageError(f"region {key}: want an object")
        region = _fold(regions[key], _REGION_FIELDS)
        for index, raw in enumerate(region.get("Nodes") or []):
            if not isinstance(raw, dict):
                raise ProbeUsageError(f"region {key} node {index}: want an object")
            node = _fold(raw, _NODE_FIELDS)
            host_name = str(node.get("HostName") or "")
            if not host_name:
                raise ProbeUsageError(f"region {key} node {index}: no HostName")
            ipv4, ipv6 = str(node.get("IPv4") or ""), str(node.get("IPv6") or "")
            # Same choice as Tailscale's dialer when the map pins addresses: IPv4, then IPv6, then DNS.
            dial = ipv4 if _is_ip(ipv4, 4) else ipv6 if _is_ip(ipv6, 6) else host_name
            stun_port = int(node.get("STUNPort") or 0)
            derp_port = int(node.get("DERPPort") or 0) or (80 if plain_http else 443)
            targets.append(Target(
                name=str(node.get("Name") or f"{key}/{index}"), host_name=host_name, dial_host=dial,
                derp_port=derp_port, tls=not plain_http, region_id=int(region.get("RegionID") or int(key)),
                region_code=str(region.get("RegionCode") or ""), cert_name=str(node.get("CertName") or ""),
                insecure=insecure or bool(node.get("InsecureForTests")),
                stun_host=str(node.get("STUNTestIP") or dial),
                stun_port=-1 if stun_port < 0 else (stun_port or DEFAULT_STUN_PORT),
                stun_only=bool(node.get("STUNOnly"))))
    return targets


def mesh_pairs(targets: list[Target]) -> list[tuple[Target, Target]]:
    """Every ordered pair of DERP (not STUN-only) nodes sharing a region."""
    by_region: dict[int | None, list[Target]] = {}
    for target in targets:
        if not target.stun_only and target.region_id is not None:
            by_region.setdefault(target.region_id, []).append(target)
    return [(a, b) for nodes in by_region.values() for a in nodes for b in nodes if a is not b]


# -- certificates ----------------------------------------------------------------------------------
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
    if _is_ip(name):
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


async def _tls_handshake(target: Target, ctx: ssl.SSLContext, timeout: float) -> tuple[bytes, str]:
    async with asyncio.timeout(timeout):
        _reader, writer = await asyncio.open_connection(
            target.dial_host, target.derp_port, ssl=ctx, server_hostname=target.host_name,
            ssl_handshake_timeout=timeout)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        version = ssl_object.version() if ssl_object else ""
        if not der:
            raise ValueError("server sent no certificate")
        return der, version or ""
    finally:
        await _close_writer(writer)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # TLS close_notify can wait on the peer for up to asyncio's 30 s shutdown timeout; never for us.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


def _describe_connect_error(exc: BaseException, address: str, timeout: float) -> str:
    """One phrase for why a TCP/TLS connection did not come up (used after a check label)."""
    from relay_worker.client import DerpClientError, UpgradeRefused

    if isinstance(exc, UpgradeRefused):
        try:
            phrase = http.HTTPStatus(exc.status).phrase
        except ValueError:
            phrase = "unexpected status"
        body = exc.body.decode("utf-8", "replace").strip().splitlines()
        return f"port refused the upgrade: {exc.status} {phrase}" + (f" ({body[0][:80]})" if body else "")
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s talking to {address}"
    cause = exc.__cause__ if isinstance(exc, DerpClientError) and exc.__cause__ is not None else exc
    if isinstance(cause, ConnectionRefusedError):
        return f"connect refused: {address} connection refused"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: {cause.verify_message or cause.reason}"
    if isinstance(cause, ssl.SSLError):
        hint = " (is it plain HTTP? use an http:// URL or --plain-http)" if cause.reason == "WRONG_VERSION_NUMBER" \
            else ""
        return f"TLS handshake failed: {cause.reason or cause}{hint}"
    if isinstance(cause, OSError):
        return f"connect failed: {address} {cause.strerror or cause}"
    if isinstance(exc, DerpClientError):
        return f"handshake failed: {exc}"
    return f"failed: {exc!r}"


# -- the checks ------------------------------------------------------------------------------------


async def check_stun(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> Check:
    """One Binding round trip; three attempts share the timeout so a lost datagram is not a failure."""
    if port < 0:
        return Check("stun", "skip", "STUNPort -1 (STUN off)")
    try:
        from stun.client import StunError, stun_request
    except ImportError as exc:
        return Check("stun", "fail", f"stun package unavailable: {exc}")
    try:
        async with asyncio.timeout(timeout + 0.5):
            result = await stun_request(host, port, timeout=timeout / 3, retries=2)
    except StunError as exc:
        return Check("stun", "fail", f"failed: {exc}")
    except TimeoutError:
        return Check("stun", "fail", f"failed: no answer from {_join_hostport(host, port)} within {timeout:g}s")
    except OSError as exc:
        return Check("stun", "fail", f"failed: {_join_hostport(host, port)}: {exc.strerror or exc}")
    mapped = _join_hostport(result.ip, result.port)
    return Check("stun", "ok", f"mapped {mapped}", round(result.rtt * 1000, 3), {"mapped": mapped})


async def check_tls(target: Target, options: ProbeOptions | None = None) -> Check:
    """Certificate name, dates and chain; with InsecureForTests/--insecure, problems are only warnings."""
    options = options or ProbeOptions()
    if not target.tls:
        return Check("tls", "skip", "plain HTTP")
    look = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    look.check_hostname = False
    look.verify_mode = ssl.CERT_NONE
    started = time.perf_counter()
    try:
        der, version = await _tls_handshake(target, look, options.timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        return Check("tls", "fail", _describe_connect_error(exc, target.address, options.timeout))
    latency = round((time.perf_counter() - started) * 1000, 3)
    try:
        cert = parse_certificate(der)
    except ValueError as exc:
        return Check("tls", "fail", f"cannot read the server certificate: {exc}")
    now = dt.datetime.now(dt.UTC)
    days_left = int((cert.not_after - now).total_seconds() // 86400)
    extra: dict[str, Any] = {"days_left": days_left, "not_after": cert.not_after.isoformat(),
                             "sha256": cert.sha256, "names": cert.dns_names + cert.ip_addresses,
                             "version": version}
    problems: list[str] = []
    if target.pin:
        if cert.sha256 != target.pin:
            problems.append(f"certificate sha256 {cert.sha256[:16]}... does not match the CertName pin "
                            f"{target.pin[:16]}...")
    else:
        want = target.cert_name or target.host_name
        if not name_matches(cert, want):
            names = ", ".join(cert.dns_names + cert.ip_addresses) or f"none (CN {cert.common_name!r} is ignored)"
            problems.append(f"certificate is not valid for {want} (names: {names})")
        if not target.insecure:
            verify = ssl.create_default_context(cafile=options.ca_file)
            verify.check_hostname = False  # the name was matched above, against CertName when set
            try:
                await _tls_handshake(target, verify, options.timeout)
            except ssl.SSLCertVerificationError as exc:
                problems.append(f"chain not trusted: {exc.verify_message or exc.reason}")
            except (OSError, TimeoutError, ValueError) as exc:
                problems.append(_describe_connect_error(exc, target.address, options.timeout))
    if cert.not_after < now:
        problems.append(f"certificate expired {cert.not_after:%Y-%m-%d} ({-days_left} days ago)")
    elif cert.not_before > now:
        problems.append(f"certificate not valid before {cert.not_before:%Y-%m-%d}")
    if problems:
        if target.insecure:
            return Check("tls", "warn", "not verified (InsecureForTests): " + "; ".join(problems), latency, extra)
        return Check("tls", "fail", "; ".join(problems), latency, extra)
    if target.insecure:
        return Check("tls", "warn", f"not verified (InsecureForTests), {days_left} days left", latency, extra)
    if days_left < options.warn_days:
        return Check("tls", "warn", f"expires in {days_left} days ({cert.not_after:%Y-%m-%d})", latency, extra)
    how = "pinned sha256 matches" if target.pin else f"valid for {target.cert_name or target.host_name}"
    return Check("tls", "ok", f"{how}, {days_left} days left", latency, extra)


async def check_http_probe(target: Target, options: ProbeOptions | None = None) -> Check:
    """GET /derp/probe (the path derper and Tailscale's prober use); 200 is healthy. The latency is
    from sending the request to the answer's head, the connection's setup left out."""
    import httpx

    from relay_worker.http_client import os_error_of

    options = options or ProbeOptions()
    ctx = client_ssl_context(target, options.ca_file)
    scheme = "https" if target.tls else "http"
    url = f"{scheme}://{target.address}/derp/probe"
    sent: list[float] = []

    async def trace(event: str, _info: dict[str, Any]) -> None:
        if event == "http11.send_request_headers.started":
            sent.append(time.perf_counter())

    # Dial the map's address, name the host in Host and SNI (as Tailscale's derphttp client does).
    # No timeouts of httpx's own: the check's one deadline is asyncio.timeout, as for every check.
    transport = httpx.AsyncHTTPTransport(verify=ctx if ctx is not None else False, retries=0)
    try:
        async with asyncio.timeout(options.timeout), httpx.AsyncClient(
                transport=transport, timeout=None, trust_env=False) as client:
            request = client.build_request(
                "GET", url, headers={"Host": target.host_name, "User-Agent": "cluster-probe", "Connection": "close"},
                extensions={"sni_hostname": target.host_name, "trace": trace})
            response = await client.send(request, stream=True)
            latency = round((time.perf_counter() - sent[0]) * 1000, 3)
            await response.aclose()  # only the status matters; the body is never read
    except TimeoutError as exc:
        return Check("probe", "fail", _describe_connect_error(exc, target.address, options.timeout))
    except httpx.RemoteProtocolError as exc:
        return Check("probe", "fail", f"not an HTTP answer from {target.address}: {exc}")
    except httpx.TransportError as exc:
        return Check("probe", "fail", _describe_connect_error(os_error_of(exc) or exc, target.address,
                                                              options.timeout))
    status = response.status_code
    if status != 200:
        return Check("probe", "fail", f"answered {status} {response.reason_phrase}, want 200", latency,
                     {"status": status})
    return Check("probe", "ok", "200", latency, {"status": status})


def _connect_kwargs(target: Target, options: ProbeOptions) -> dict[str, Any]:
    return {"is_prober": True, "timeout": options.timeout, "ssl_context": client_ssl_context(target, options.ca_file),
            "server_hostname": target.host_name, "mesh_key": options.mesh_key}


async def _close_client(client: DerpClient) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 1.0)


async def _connect_pair(src: Target, dst: Target, options: ProbeOptions) -> tuple[DerpClient, DerpClient]:
    """Receiver on dst, sender on src, connected concurrently. Raises (target, exception) on failure."""
    from relay_worker.client import DerpClient

    results = await asyncio.gather(DerpClient.connect(dst.url, **_connect_kwargs(dst, options)),
                                   DerpClient.connect(src.url, **_connect_kwargs(src, options)),
                                   return_exceptions=True)
    clients = [r for r in results if not isinstance(r, BaseException)]
    for target, result in ((dst, results[0]), (src, results[1])):
        if isinstance(result, BaseException):
            for client in clients:
                await _close_client(client)  # type: ignore[arg-type]
            if not isinstance(result, Exception):
                raise result
            raise _PairConnectError(target, result)
    return results[1], results[0]  # type: ignore[return-value]


class _PairConnectError(Exception):
    def __init__(self, target: Target, error: Exception) -> None:
        super().__init__(str(error))
        self.target = target
        self.error = error


async def _relay_latency(sender: DerpClient, receiver: DerpClient, deadline: float, samples: int) -> float:
    """Median one-way delivery time (s) of timestamped packets; raises TimeoutError at the deadline.

    Packets are re-sent until the first one arrives (registration and mesh learning take a moment),
    then `samples` packets are timed one at a time.
    """
    tag = os.urandom(8)  # tells our packets from anything else the throwaway key might receive

    def packet(seq: int) -> bytes:
        return b"cluster-probe " + tag + struct.pack(">Id", seq, time.perf_counter())

    async def wait_for(predicate_seq: int | None) -> float:
        while True:
            got = await receiver.recv_packet()
            data = got.data
            if got.src != sender.public_key or not data.startswith(b"cluster-probe " + tag) or len(data) != 34:
                continue
            seq, sent = struct.unpack(">Id", data[22:])
            if predicate_seq is None or seq == predicate_seq:
                return time.perf_counter() - sent

    async def resend() -> None:
        seq = 0
        while True:
            await sender.send(receiver.public_key, packet(seq))
            seq += 1
            await asyncio.sleep(RESEND_INTERVAL)

    loop = asyncio.get_running_loop()
    async with asyncio.timeout_at(deadline - time.monotonic() + loop.time()):
        sending = asyncio.create_task(resend())
        try:
            await wait_for(None)
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
        timings = []
        for i in range(samples):
            seq = 1_000_000 + i  # above anything the resend loop could have used
            await sender.send(receiver.public_key, packet(seq))
            timings.append(await wait_for(seq))
    return statistics.median(timings)


async def check_derp(target: Target, options: ProbeOptions | None = None) -> Check:
    """Two throwaway prober keys on this node; one relays timestamped packets to the other."""
    options = options or ProbeOptions()
    if target.stun_only:
        return Check("derp", "skip", "STUN-only node")
    try:
        async with asyncio.timeout(options.timeout * 2 + 2):  # connect + deliver, each bounded below
            try:
                sender, receiver = await _connect_pair(target, target, options)
            except _PairConnectError as exc:
                return Check("derp", "fail", _describe_connect_error(exc.error, target.address, options.timeout))
            try:
                latency = await _relay_latency(sender, receiver, time.monotonic() + options.timeout, options.samples)
            except TimeoutError:
                return Check("derp", "fail", f"connected, but a packet was not relayed within {options.timeout:g}s")
            except Exception as exc:  # the server closing on us mid-check is a finding, not a crash
                return Check("derp", "fail", f"connection lost during relay: {exc}")
            finally:
                await _close_client(sender)
                await _close_client(receiver)
    except TimeoutError:
        return Check("derp", "fail", f"timed out after {options.timeout * 2 + 2:g}s")
    return Check("derp", "ok", "relayed", round(latency * 1000, 3))


async def check_mesh(src: Target, dst: Target, options: ProbeOptions | None = None) -> MeshReport:
    """A client on src sends to a client on dst: passes only when the two nodes mesh."""
    options = options or ProbeOptions()
    report = MeshReport(src.region_id, src.name, dst.name, "fail")
    try:
        async with asyncio.timeout(options.timeout * 2 + 2):
            try:
                sender, receiver = await _connect_pair(src, dst, options)
            except _PairConnectError as exc:
                cause = _describe_connect_error(exc.error, exc.target.address, options.timeout)
                report.detail = f"cannot reach {exc.target.name}: DERP {cause}"
                return report
            try:
                latency = await _relay_latency(sender, receiver, time.monotonic() + options.timeout, options.samples)
            except TimeoutError:
                report.detail = f"packet not delivered across nodes {src.name}->{dst.name} within {options.timeout:g}s"
                return report
            except Exception as exc:
                report.detail = f"connection lost during relay {src.name}->{dst.name}: {exc}"
                return report
            finally:
                await _close_client(sender)
                await _close_client(receiver)
    except TimeoutError:
        report.detail = f"timed out after {options.timeout * 2 + 2:g}s"
        return report
    report.status, report.detail, report.latency_ms = "ok", "delivered", round(latency * 1000, 3)
    return report


async def _tcp_checks(target: Target, options: ProbeOptions) -> list[Check]:
    if target.stun_only:
        skip = "STUN-only node"
        return [Check("tls", "skip", skip), Check("probe", "skip", skip), Check("derp", "skip", skip)]
    return list(await asyncio.gather(check_tls(target, options), check_http_probe(target, options),
                                     check_derp(target, options)))


def _stun_check(target: Target, options: ProbeOptions) -> Any:
    return check_stun(target.stun_host or target.dial_host, target.stun_port, options.timeout)


async def probe_node(target: Target, options: ProbeOptions | None = None) -> NodeReport:
    """All checks of one node: STUN first, alone, then TLS, /derp/probe and DERP together."""
    options = options or ProbeOptions()
    checks = [await _stun_check(target, options), *await _tcp_checks(target, options)]
    return NodeReport(target, {check.name: check for check in checks})


async def probe_all(targets: list[Target], options: ProbeOptions | None = None,
                    *, mesh: bool = True) -> tuple[list[NodeReport], list[MeshReport]]:
    """Every node concurrently, then the cross-node pairs whose both ends relayed on their own.

    STUN runs as a phase of its own: its RTT is taken when the event loop gets to the datagram, so
    TLS handshakes and key generation running alongside would inflate a loopback 0.1 ms to several.
    """
    options = options or ProbeOptions()
    limit = asyncio.Semaphore(64)  # a large map must not open thousands of sockets at once

    async def bounded(coro: Any) -> Any:
        async with limit:
            return await coro

    stuns = await asyncio.gather(*(bounded(_stun_check(t, options)) for t in targets))
    rest = await asyncio.gather(*(bounded(_tcp_checks(t, options)) for t in targets))
    nodes = [NodeReport(t, {c.name: c for c in [stun, *others]}) for t, stun, others in zip(targets, stuns, rest,
                                                                                          strict=True)]
    relays = {id(report.target) for report in nodes if report.checks["derp"].status == "ok"}
    meshes: list[MeshReport] = []
    pending = []
    for src, dst in (mesh_pairs(targets) if mesh else []):
        if id(src) in relays and id(dst) in relays:
            pending.append(bounded(check_mesh(src, dst, options)))
        else:
            broken = src.name if id(src) not in relays else dst.name
            meshes.append(MeshReport(src.region_id, src.name, dst.name, "skip",
                                     f"skipped: DERP on {broken} failed on its own"))
    meshes.extend(await asyncio.gather(*pending))
    meshes.sort(key=lambda m: (m.region_id or 0, m.src, m.dst))
    return nodes, meshes


# -- output ----------------------------------------------------------------------------------------


def report_json(nodes: list[NodeReport], meshes: list[MeshReport]) -> dict[str, Any]:
    ok = all(n.ok for n in nodes) and not any(m.failed for m in meshes)
    return {
        "ok": ok,
        "nodes": [{
            "name": n.target.name, "region_id": n.target.region_id, "region_code": n.target.region_code,
            "url": n.target.url, "stun": _join_hostport(n.target.stun_host or n.target.dial_host, n.target.stun_port)
            if n.target.stun_port >= 0 else None,
            "ok": n.ok, "summary": n.summary(),
            "checks": {name: asdict(check) for name, check in n.checks.items()},
        } for n in nodes],
        "mesh": [asdict(m) for m in meshes],
    }


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def _cell(check: Check, text: str) -> str:
    style = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}[check.status]
    return f"[{style}]{text}[/{style}]"


def render_table(nodes: list[NodeReport], meshes: list[MeshReport], file: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = file or sys.stdout
    # Piped output has no terminal width; rich would squeeze to 80 columns and wrap the addresses.
    console = Console(file=out, width=None if out.isatty() else 160, highlight=False)
    table = Table(title="DERP probe", title_justify="left")
    for column in ("Node", "Region", "STUN", "Mapped address", "TLS", "/derp/probe", "DERP", "Result"):
        table.add_column(column, no_wrap=column != "Result")
    for n in nodes:
        c = n.checks
        stun = c["stun"]
        tls = c["tls"]
        days = tls.extra.get("days_left")
        tls_text = {"skip": "http" if not n.target.stun_only else "-"}.get(tls.status) or (
            f"{days} days" if days is not None else "fail")
        if tls.status == "warn" and n.target.insecure:
            tls_text += " (insecure)"
        region = f"{n.target.region_id or '-'}" + (f" {n.target.region_code}" if n.target.region_code else "")
        result = "[green]ok[/green]" if n.ok else "[red]FAIL[/red]"
        if n.ok and any(check.status == "warn" for check in c.values()):
            result = "[yellow]ok (warn)[/yellow]"
        table.add_row(
            escape(n.target.name), escape(region),
            _cell(stun, {"skip": "off"}.get(stun.status) or (_ms(stun.latency_ms) or "fail")),
            escape(stun.extra.get("mapped", "")),
            _cell(tls, escape(tls_text)),
            _cell(c["probe"], {"skip": "-"}.get(c["probe"].status) or (
                f"{c['probe'].extra['status']}" if "status" in c["probe"].extra else "fail")),
            _cell(c["derp"], {"skip": "-"}.get(c["derp"].status) or (_ms(c["derp"].latency_ms) or "fail")),
            result)
    console.print(table)
    if meshes:
        mesh_table = Table(title="Cross-node delivery (same region)", title_justify="left")
        for column in ("Region", "From -> To", "Latency", "Result"):
            mesh_table.add_column(column)
        for m in meshes:
            style = {"ok": "green", "fail": "red", "skip": "dim"}[m.status]
            mesh_table.add_row(str(m.region_id), escape(f"{m.src} -> {m.dst}"), _ms(m.latency_ms),
                               f"[{style}]{escape(m.status if m.status == 'ok' else m.detail)}[/{style}]")
        console.print(mesh_table)
    # The full reasons go on their own lines: a table cell would truncate or wrap them.
    for n in nodes:
        warns = [f"{LABELS[k]} {v.detail}" for k, v in n.checks.items() if v.status == "warn"]
        if not n.ok:
            print(f"FAIL {n.target.name} ({n.target.url}): {n.summary()}", file=out)
        elif warns:
            print(f"WARN {n.target.name}: {'; '.join(warns)}", file=out)
    for m in meshes:
        if m.failed:
            print(f"FAIL cross-node {m.src}->{m.dst}: {m.detail}", file=out)
    failed = sum(not n.ok for n in nodes) + sum(m.failed for m in meshes)
    print(f"{len(nodes)} node(s), {len(meshes)} cross-node pair(s): "
          + (f"{failed} failed" if failed else "all checks passed"), file=out)


# -- command line ----------------------------------------------------------------------------------


def _targets_from_args(args: argparse.Namespace) -> list[Target]:
    stun_port = -1 if args.no_stun else DEFAULT_STUN_PORT if args.stun_port is None else args.stun_port
    if args.urls and args.derpmap:
        raise ProbeUsageError("give URLs or --derpmap, not both")
    if args.urls:
        return [target_from_url(url, stun_port=stun_port, insecure=args.insecure, cert_name=args.cert_name)
                for url in args.urls]
    if args.derpmap:
        targets = targets_from_derpmap(load_derpmap(args.derpmap), plain_http=args.plain_http,
                                       insecure=args.insecure)
    else:
        # Nothing named: probe what this node's own config publishes (`cluster derpmap`).
        from cluster.config import load_config
        from cluster.derpmap import build_derpmap

        config = load_config(args.config, os.environ, {})
        plain = args.plain_http or (not config.tls and not config.regions)
        targets = targets_from_derpmap(build_derpmap(config), plain_http=plain, insecure=args.insecure)
    if args.no_stun or args.stun_port is not None:
        for target in targets:  # an explicit flag beats the map's STUNPort
            target.stun_port = stun_port
    return targets


def read_mesh_key_file(path: str) -> str:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ProbeUsageError(f"--mesh-psk-file: cannot read {path}: {exc.strerror}") from exc
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ProbeUsageError(f"--mesh-psk-file: {path} must hold 64 hex characters (derper's mesh key)")
    return text.lower()


def _mesh_key_from_args(args: argparse.Namespace) -> str:
    """--mesh-psk-file (derpprobe's flag), else TAILSCALE_DERPER_MESH_KEY (derpprobe -dev), else the
    mesh key file of --config when probing this node's own derpMap."""
    if args.mesh_psk_file:
        return read_mesh_key_file(args.mesh_psk_file)
    env = os.environ.get("TAILSCALE_DERPER_MESH_KEY", "").strip()
    if env:
        if len(env) != 64 or any(c not in "0123456789abcdefABCDEF" for c in env):
            raise ProbeUsageError("TAILSCALE_DERPER_MESH_KEY: want 64 hex characters")
        return env.lower()
    if not args.urls and not args.derpmap:
        from cluster.config import ConfigError, load_config

        try:
            path = load_config(args.config, os.environ, {}).values["server.mesh_key_file"]
        except ConfigError:
            return ""
        return read_mesh_key_file(path) if path else ""
    return ""


def cmd_probe(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        print("cluster probe: --timeout must be > 0", file=sys.stderr)
        return 2
    try:
        targets = _targets_from_args(args)
    except ProbeUsageError as exc:
        print(f"cluster probe: {exc}", file=sys.stderr)
        return 2
    if not targets:
        print("cluster probe: no nodes to probe", file=sys.stderr)
        return 2
    try:
        mesh_key = _mesh_key_from_args(args)
    except ProbeUsageError as exc:
        print(f"cluster probe: {exc}", file=sys.stderr)
        return 2
    options = ProbeOptions(timeout=args.timeout, ca_file=args.ca_file, mesh_key=mesh_key)
    nodes, meshes = asyncio.run(probe_all(targets, options, mesh=not args.no_mesh))
    doc = report_json(nodes, meshes)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        render_table(nodes, meshes)
    return 0 if doc["ok"] else 1


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "probe", help="check STUN, TLS, /derp/probe and a real DERP relay round trip for each node",
        description="Probe DERP nodes end to end. Without URLs or --derpmap, probes the derpMap of --config "
                    "(this node alone by default). Exit status: 0 all passed, 1 a check failed, 2 usage.")
    parser.add_argument("urls", nargs="*", metavar="URL",
                        help="DERP URLs like https://derp.example.com/derp or http://127.0.0.1:3340/derp")
    parser.add_argument("--derpmap", metavar="FILE",
                        help="derpMap JSON (`cluster derpmap` output or a policy file) or headscale YAML")
    parser.add_argument("--config", help="TOML config whose derpMap to probe when no URL/--derpmap is given")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"seconds each check may take (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify TLS certificates (still reported), like InsecureForTests")
    parser.add_argument("--ca-file", metavar="PEM", help="extra CA bundle to trust (private CAs, tests)")
    parser.add_argument("--stun-port", type=int, default=None, metavar="PORT",
                        help=f"STUN port (default: {DEFAULT_STUN_PORT} for URLs, the node's STUNPort for a "
                             "derpMap; -1 = skip STUN)")
    parser.add_argument("--no-stun", action="store_true", help="skip the STUN check")
    parser.add_argument("--cert-name", default="", metavar="NAME",
                        help="for URL targets: expected certificate name or sha256-raw:<hex> pin")
    parser.add_argument("--plain-http", action="store_true",
                        help="dial derpMap nodes over plain HTTP (dev mode; what TS_DEBUG_USE_DERP_HTTP=1 does)")
    parser.add_argument("--no-mesh", action="store_true", help="skip the cross-node delivery checks")
    parser.add_argument("--mesh-psk-file", "--mesh-key-file", "-mesh-psk-file", dest="mesh_psk_file", metavar="FILE",
                        help="derper's mesh key (64 hex), as derpprobe: lets the probe's keys through nodes "
                             "that verify clients (also TAILSCALE_DERPER_MESH_KEY)")
    parser.set_defaults(func=cmd_probe)
