"""The per-node checks that need no DERP session: STUN, TLS and GET /derp/probe."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
from typing import Any

from .certs import client_ssl_context, name_matches, parse_certificate
from .errors import describe_connect_error
from .model import DEFAULT_TIMEOUT, Check, ProbeOptions, Target, join_hostport


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
        return Check("stun", "fail", f"failed: no answer from {join_hostport(host, port)} within {timeout:g}s")
    except OSError as exc:
        return Check("stun", "fail", f"failed: {join_hostport(host, port)}: {exc.strerror or exc}")
    mapped = join_hostport(result.ip, result.port)
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
        return Check("tls", "fail", describe_connect_error(exc, target.address, options.timeout))
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
                problems.append(describe_connect_error(exc, target.address, options.timeout))
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
        return Check("probe", "fail", describe_connect_error(exc, target.address, options.timeout))
    except httpx.RemoteProtocolError as exc:
        return Check("probe", "fail", f"not an HTTP answer from {target.address}: {exc}")
    except httpx.TransportError as exc:
        return Check("probe", "fail", describe_connect_error(os_error_of(exc) or exc, target.address,
                                                              options.timeout))
    status = response.status_code
    if status != 200:
        return Check("probe", "fail", f"answered {status} {response.reason_phrase}, want 200", latency,
                     {"status": status})
    return Check("probe", "ok", "200", latency, {"status": status})
