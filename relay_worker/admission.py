"""Admission: whether a client may use this relay, decided after its ClientInfo box opens and before
ServerInfo is sent (the `Relay.admission` hook that the `ServerSession` calls).

Checks, in this order, every configured one having to pass (the first refusal decides):
1. allow-keys file: a static list of `nodekey:<hex>` lines, reloaded when it changes or on SIGHUP;
2. tailscaled's LocalAPI (derper's --verify-clients): `GET /localapi/v0/whois?addr=nodekey:<hex>` over
   its unix socket; 200 admits, 404 refuses, anything else refuses (fail closed);
3. an admission URL (derper's --verify-client-url, served by headscale at /verify): POST
   `{"NodePublic": "nodekey:<hex>", "Source": "<ip>"}`, admit on 200 with `{"Allow": true}` (the field
   name matched case-insensitively and only the first JSON value read, as Go's decoder does); any other
   status refuses; only when the URL is unreachable or times out does `fail_open` decide.

As in derper, every connection is checked with its own Source (no cache by default). An opt-in
decision cache (cache_ttl > 0) keeps answers per node key; concurrent handshakes of one key and source
share one lookup, lookups have a timeout and a concurrency cap, and all of it runs as tasks on the
worker's loop: a slow or dead verifier delays only the handshakes that wait for it, never the relay
path or other clients' handshakes.

This module takes plain parameters and imports nothing from `cluster` (relay_worker must not).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from .http_client import os_error_of

if TYPE_CHECKING:
    from .relay import Relay
    from .seams import AdmissionSubject

log = logging.getLogger("relay_worker.admission")

DEFAULT_TAILSCALED_SOCKET = "/var/run/tailscale/tailscaled.sock"
#: tailscaled's LocalAPI refuses any other Host (ipn/localapi validHost); Tailscale's own client sends it.
LOCALAPI_HOST = "local-tailscaled.sock"
#: Tailscale's LocalAPI client sends its capability version in Tailscale-Cap. tailscaled does not gate
#: whois on it; we send the value tailscaled 1.82 announces so logs on that side look ordinary.
LOCALAPI_CAPABILITY = "115"
#: derper reads at most 4 KiB of the admission controller's answer; a little more room costs nothing.
MAX_RESPONSE_BODY = 64 * 1024
#: derper decodes at most this much of the admission controller's answer (io.LimitReader 4<<10).
VERIFY_URL_DECODE_LIMIT = 4 << 10
#: tailscaled's whois document grows with the node's capability map; Go's client reads it whole.
MAX_LOCALAPI_BODY = 4 * 1024 * 1024

Callback = Callable[[bool, str], None]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # human-readable, goes to the log and the refusal
    label: str  # short counter label: "ok", "fail_open", or the refusal reason
    ttl: float  # how long the decision may be cached


class VerifierError(Exception):
    """A verifier could not give an answer (unreachable, timed out, malformed reply)."""


class BodyError(VerifierError):
    """The answer's status line and headers arrived, its body could not be read (Go: the request
    succeeded and decoding its body failed)."""


# -- the HTTP client ---------------------------------------------------------------------------------
#
# httpx, one AsyncClient per verifier, made on first use and kept for the worker's life: a pool of at
# most max_lookups connections (the lookup semaphore never lets more requests run). Its own timeouts
# are off: the caller's `asyncio.timeout(self.timeout)` is the one budget of a lookup, connect
# included, as derper's context deadline is. trust_env=False: proxy variables in the worker's
# environment never reroute an admission request (the TLS trust store still honours SSL_CERT_FILE).


def _client(transport: httpx.AsyncHTTPTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=None, trust_env=False,
                             headers={"User-Agent": "derp-cluster-admission"})


def _limits(max_connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)


async def http_request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    max_body: int = MAX_RESPONSE_BODY,
    truncate: bool = False,
    progress: dict[str, int] | None = None,
) -> tuple[int, bytes]:
    """One request; returns (status, body). Raises httpx.TransportError before the answer's head,
    BodyError once the head is in (progress["status"] is set then).

    truncate: keep the first max_body bytes of a longer body instead of failing (derper reads only the
    first 4 KiB of an admission answer).
    """
    async with client.stream(method, url, headers=headers, content=body) as response:
        if progress is not None:
            progress["status"] = response.status_code
        out = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                out += chunk
                if len(out) > max_body:
                    if truncate:
                        return response.status_code, bytes(out[:max_body])
                    raise BodyError("HTTP answer body too large")
        except httpx.HTTPError as exc:
            raise BodyError(f"malformed HTTP answer body: {exc}") from exc
        return response.status_code, bytes(out)


# -- Go-compatible JSON reading -------------------------------------------------------------------


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs in order, duplicates kept (Go's decoder sees them all)."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_Pairs, parse_constant=_no_constants)


def first_json_value(data: bytes) -> Any:
    """The first JSON value in data, as Go's json.Decoder.Decode reads it: leading whitespace skipped,
    anything after the value ignored, invalid UTF-8 replaced. Objects come back as _Pairs."""
    text = data.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise ValueError("empty answer (EOF)")
    value, _ = _DECODER.raw_decode(text, start)
    return value


def admit_response_allows(body: bytes) -> bool:
    """tailcfg.DERPAdmitClientResponse decoded as derper does (first 4 KiB, first value): True when
    Allow is true. Go matches field names case-insensitively and the last duplicate wins; a null
    leaves the field false. Raises ValueError where Go's Decode returns an error."""
    doc = first_json_value(body[:VERIFY_URL_DECODE_LIMIT])
    if doc is None:
        return False
    if not isinstance(doc, _Pairs):
        raise ValueError(f"want a JSON object, got {type(doc).__name__}")
    allow = False
    for name, value in doc:
        if name.lower() != "allow":
            continue
        if value is None:
            continue
        if not isinstance(value, bool):
            raise ValueError(f"Allow is {type(value).__name__}, not a boolean")
        allow = value
    return allow


def check_whois_json(body: bytes) -> None:
    """apitype.WhoIsResponse as Go's client decodes it (json.Unmarshal: the whole body, one value).
    Raises ValueError when Go would fail: not JSON, trailing data, or a wrongly typed top level."""
    text = body.decode("utf-8", "replace")
    value = _DECODER.decode(text)  # rejects trailing non-whitespace, as json.Unmarshal does
    if value is None:
        return
    if not isinstance(value, _Pairs):
        raise ValueError(f"want a JSON object, got {type(value).__name__}")
    for name, field_value in value:
        if name.lower() in ("node", "userprofile", "capmap") and field_value is not None \
                and not isinstance(field_value, _Pairs):
            raise ValueError(f"{name} is {type(field_value).__name__}, not an object")


# -- the policy ------------------------------------------------------------------------------------


def nodekey_text(key: bytes) -> str:
    return "nodekey:" + key.hex()


def source_ip(peer: Any) -> str:
    """The client's IP as derper reports it in DERPAdmitClientRequest.Source (v4-mapped unwrapped)."""
    if not isinstance(peer, tuple) or not peer:
        return ""
    try:
        addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class AdmissionPolicy:
    """The `relay.admission(conn, callback)` hook. Build with plain values; see `install`."""

    def __init__(
        self,
        *,
        verify_clients: bool = False,
        tailscaled_socket: str = DEFAULT_TAILSCALED_SOCKET,
        verify_client_url: str = "",
        fail_open: bool = True,
        allow_keys_file: str = "",
        cache_ttl: float = 0.0,
        negative_ttl: float | None = None,
        error_ttl: float | None = None,
        timeout: float = 5.0,
        max_lookups: int = 32,
        max_cache_entries: int = 65536,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verify_clients = verify_clients
        self.tailscaled_socket = tailscaled_socket or DEFAULT_TAILSCALED_SOCKET
        self.verify_client_url = verify_client_url
        self.fail_open = fail_open
        self.allow_keys_file = allow_keys_file
        self.cache_ttl = max(0.0, cache_ttl)
        # A refused key is re-asked sooner than an admitted one is re-checked: a node that just
        # joined the tailnet may reach us before tailscaled/headscale knows it, and it should not be
        # locked out for a whole positive TTL. The cost is one lookup per key per negative_ttl.
        self.negative_ttl = min(self.cache_ttl, 5.0) if negative_ttl is None else max(0.0, negative_ttl)
        # Answers derived from a verifier error (fail-open admits, fail-closed refusals) are kept only
        # briefly: long enough to absorb a reconnect storm, short enough to notice recovery.
        self.error_ttl = min(self.cache_ttl, 2.0) if error_ttl is None else max(0.0, error_ttl)
        self.timeout = timeout
        self.max_cache_entries = max_cache_entries
        self.clock = clock
        self._url = urlsplit(verify_client_url) if verify_client_url else None
        if self._url is not None and (self._url.scheme not in ("http", "https") or not self._url.hostname):
            raise ValueError(f"verify URL {verify_client_url!r}: want http:// or https:// with a host")
        self._ssl: ssl.SSLContext | None = None
        if self._url is not None and self._url.scheme == "https":
            # the system trust store (SSL_CERT_FILE / SSL_CERT_DIR point it at a private CA)
            self._ssl = ssl_context or ssl.create_default_context()
        self._cache: dict[bytes, tuple[float, Decision]] = {}
        # in-flight lookups by (key, source): without a cache, each Source gets its own answer
        self._inflight: dict[tuple[bytes, str], asyncio.Task[Decision]] = {}
        self._tasks: set[asyncio.Task[Decision]] = set()
        self._slots = asyncio.Semaphore(max_lookups)
        self._max_lookups = max_lookups
        self._localapi_http: httpx.AsyncClient | None = None
        self._url_http: httpx.AsyncClient | None = None
        self._allowed: frozenset[bytes] = frozenset()
        self._allow_sig: tuple[int, int, int] | None = None
        self._allow_checked = -1e9
        self._last_log: dict[str, float] = {}
        self.counters: dict[str, int] = {
            "admitted": 0, "refused": 0, "cache_hits": 0, "cache_misses": 0, "lookups": 0,
            "lookups_shared": 0, "fail_open_admits": 0, "allow_keys_reloads": 0,
        }
        self.refused_by_reason: dict[str, int] = {}
        self.verifier_errors: dict[str, int] = {"localapi": 0, "url": 0}
        if allow_keys_file:
            self._load_allow_file()

    @property
    def remote(self) -> bool:
        return self.verify_clients or self._url is not None

    # -- the hook -----------------------------------------------------------------------------------

    def __call__(self, client: AdmissionSubject, callback: Callback, /) -> None:
        """Decide on a client; callback(allowed, reason) now (local or cached answer) or from a task later."""
        self.check(client.key, source_ip(client.peer), callback)

    def check(self, key: bytes, source: str, callback: Callback) -> None:
        now = self.clock()
        if self.allow_keys_file:
            self._maybe_reload(now)
            if key not in self._allowed:
                why = f"{nodekey_text(key)} is not in allow-keys file {self.allow_keys_file}"
                self._count(False, "not_in_allow_keys_file")
                callback(False, why)
                return
        if not self.remote:
            self._count(True, "ok")
            callback(True, "")
            return
        cached = self._cache.get(key) if self.cache_ttl > 0 else None
        if cached is not None:
            if cached[0] > now:
                self.counters["cache_hits"] += 1
                decision = cached[1]
                self._count(decision.allowed, decision.label)
                callback(decision.allowed, decision.reason)
                return
            del self._cache[key]
        self.counters["cache_misses"] += 1
        task = self._inflight.get((key, source))
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(key, source))
            self._inflight[(key, source)] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.counters["lookups_shared"] += 1

        def deliver(done: asyncio.Task[Decision]) -> None:
            if done.cancelled():
                decision = Decision(False, "admission lookup cancelled (shutting down)", "cancelled", 0.0)
            else:
                decision = done.result()
            self._count(decision.allowed, decision.label)
            callback(decision.allowed, decision.reason)

        task.add_done_callback(deliver)  # done callbacks run from the loop, after the lookup ends

    async def decide(self, key: bytes, source: str = "") -> Decision:
        """The decision for key as an awaitable (tools, benchmarks); same path and counters as the hook."""
        future: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()

        def done(allowed: bool, reason: str) -> None:
            if not future.done():
                future.set_result((allowed, reason))

        self.check(key, source, done)
        allowed, reason = await future
        return Decision(allowed, reason, "ok" if allowed else "refused", 0.0)

    # -- remote lookups -----------------------------------------------------------------------------

    async def _lookup(self, key: bytes, source: str) -> Decision:
        try:
            decision = await self._lookup_uncached(key, source)
        except Exception as exc:  # a bug here must refuse one client, not leave it hanging
            log.exception("admission lookup for %s failed", nodekey_text(key))
            decision = Decision(False, f"admission lookup failed: {exc}", "internal_error", 0.0)
        finally:
            self._inflight.pop((key, source), None)
        if decision.ttl > 0 and self.cache_ttl > 0:
            self._store(key, decision)
        return decision

    async def _lookup_uncached(self, key: bytes, source: str) -> Decision:
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            # Our own queue, not the verifier, was slow: never let that count as "verifier
            # unreachable", or a flood of fresh keys could force fail-open admits.
            return Decision(False, f"too many admission lookups in flight for {self.timeout:g}s", "overloaded", 0.0)
        try:
            self.counters["lookups"] += 1
            ttl = self.cache_ttl
            if self.verify_clients:
                decision = await self._check_localapi(key)
                if not decision.allowed:
                    return decision
                ttl = min(ttl, decision.ttl)
            if self._url is not None:
                decision = await self._check_url(key, source)
                if not decision.allowed:
                    return decision
                return Decision(True, decision.reason, decision.label, min(ttl, decision.ttl))
            return Decision(True, "", "ok", ttl)
        finally:
            self._slots.release()

    def _localapi_client(self) -> httpx.AsyncClient:
        if self._localapi_http is None:
            # Plain HTTP over a unix socket: verify=False only skips loading a trust store no TLS uses.
            self._localapi_http = _client(httpx.AsyncHTTPTransport(
                uds=self.tailscaled_socket, verify=False, limits=_limits(self._max_lookups)))
        return self._localapi_http

    def _url_client(self) -> httpx.AsyncClient:
        if self._url_http is None:
            verify: ssl.SSLContext | bool = self._ssl if self._ssl is not None else False
            self._url_http = _client(httpx.AsyncHTTPTransport(verify=verify, limits=_limits(self._max_lookups)))
        return self._url_http

    async def _check_localapi(self, key: bytes) -> Decision:
        path = self.tailscaled_socket
        url = f"http://{LOCALAPI_HOST}/localapi/v0/whois?addr=" + quote(nodekey_text(key), safe="")
        problem = ""
        try:
            async with asyncio.timeout(self.timeout):
                status, body = await http_request(
                    self._localapi_client(), "GET", url, headers={"Tailscale-Cap": LOCALAPI_CAPABILITY},
                    max_body=MAX_LOCALAPI_BODY)
        except TimeoutError:
            problem = f"tailscaled LocalAPI at {path} did not answer within {self.timeout:g}s"
        except (httpx.TransportError, VerifierError) as exc:
            cause = os_error_of(exc)
            # by errno: the socket layer under httpx raises a plain OSError, not its subclasses
            errno_ = cause.errno if cause is not None else None
            if errno_ == errno.ENOENT:
                problem = f"tailscaled LocalAPI socket {path} missing"
            elif errno_ == errno.ECONNREFUSED:
                problem = f"tailscaled LocalAPI socket {path} refuses connections (is tailscaled running?)"
            elif errno_ in (errno.EACCES, errno.EPERM):
                problem = f"no permission to open tailscaled LocalAPI socket {path}"
            else:
                problem = f"tailscaled LocalAPI at {path} failed: {cause or exc}"
        else:
            if status == 200:
                try:
                    check_whois_json(body)
                except ValueError as exc:
                    problem = f"tailscaled LocalAPI at {path} answered 200 with a whois body that is not " \
                              f"WhoIsResponse JSON ({exc})"
                else:
                    return Decision(True, "", "ok", self.cache_ttl)
            elif status == 404:
                return Decision(False, f"{nodekey_text(key)} not found in local tailscaled "
                                "(not a node of this tailnet)", "not_in_tailnet", self.negative_ttl)
            text = body[:200].decode("utf-8", "replace").strip()
            if problem:
                pass
            elif status == 400 and "invalid 'addr'" in text:
                problem = "tailscaled is too old to look up node keys (whois?addr=nodekey:… needs 1.70+)"
            elif status == 403:
                problem = f"tailscaled LocalAPI at {path} denied whois (403 {text!r})"
            else:
                problem = f"tailscaled LocalAPI at {path} answered {status} {text!r}"
        self.verifier_errors["localapi"] += 1
        self._log_problem("localapi", f"{problem}: refusing %s", key)
        return Decision(False, problem, "localapi_error", self.error_ttl)

    async def _check_url(self, key: bytes, source: str) -> Decision:
        payload = json.dumps({"NodePublic": nodekey_text(key), "Source": source}).encode()
        problem = ""
        status = 0
        progress: dict[str, int] = {}
        try:
            async with asyncio.timeout(self.timeout):
                status, body = await http_request(
                    self._url_client(), "POST", self.verify_client_url,
                    headers={"Content-Type": "application/json", "Accept": "application/json"}, body=payload,
                    max_body=VERIFY_URL_DECODE_LIMIT, truncate=True, progress=progress)
        except (TimeoutError, BodyError) as exc:
            if "status" not in progress:
                problem = f"verify URL {self.verify_client_url} did not answer within {self.timeout:g}s"
            else:
                # The answer's head arrived (Go's Do returned): a body we cannot read is a refusal,
                # never a fail-open admit.
                self.verifier_errors["url"] += 1
                what = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                why = f"verify URL {self.verify_client_url} answered {progress['status']} and its body failed: {what}"
                self._log_problem("urlbody", f"{why}: refusing %s", key)
                return Decision(False, why, "url_error", self.error_ttl)
        except httpx.TransportError as exc:
            # derper: http.Client.Do returned an error (no answer's head): connect, TLS, or protocol
            cause = os_error_of(exc)
            problem = f"verify URL {self.verify_client_url} unreachable: {cause.strerror or cause}" if cause \
                else f"verify URL {self.verify_client_url} failed: {exc or type(exc).__name__}"
        else:
            if status != 200:
                # derper: any status but 200 is the controller's answer, a refusal, whatever the
                # fail-open setting (headscale answers 500 when its lookup fails). Logged, because a
                # 4xx usually means a wrong path or auth in the URL.
                self.verifier_errors["url"] += 1
                why = f"verify URL {self.verify_client_url} answered {status}"
                self._log_problem("urlstatus", f"{why}: refusing %s", key)
                return Decision(False, why, "url_error", self.error_ttl)
            try:
                allowed = admit_response_allows(body)
            except ValueError as exc:
                self.verifier_errors["url"] += 1
                why = f"verify URL {self.verify_client_url} answered 200 without a DERPAdmitClientResponse ({exc})"
                self._log_problem("urljson", f"{why}: refusing %s", key)
                return Decision(False, why, "url_error", self.error_ttl)
            if allowed:
                return Decision(True, "", "ok", self.cache_ttl)
            return Decision(False, f"verify URL refused {nodekey_text(key)} from {source or '?'}",
                            "url_denied", self.negative_ttl)
        # Unreachable or timed out (derper: http.Client.Do returned an error): fail_open decides.
        self.verifier_errors["url"] += 1
        if self.fail_open:
            self.counters["fail_open_admits"] += 1
            self._log_problem("url", f"{problem}: admitting %s (fail-open)", key)
            return Decision(True, f"{problem} (fail-open)", "fail_open", self.error_ttl)
        self._log_problem("url", f"{problem}: refusing %s (fail-closed)", key)
        return Decision(False, problem, "url_unreachable", self.error_ttl)

    # -- cache, counters, logs ----------------------------------------------------------------------

    def _store(self, key: bytes, decision: Decision) -> None:
        cache = self._cache
        if len(cache) >= self.max_cache_entries:
            now = self.clock()
            for stale in [k for k, (expires, _) in cache.items() if expires <= now]:
                del cache[stale]
            # Still full (e.g. a flood of fresh keys): forget the oldest insertions.
            while len(cache) >= self.max_cache_entries:
                del cache[next(iter(cache))]
        cache[key] = (self.clock() + decision.ttl, decision)

    def forget(self, key: bytes | None = None) -> None:
        """Drop one cached decision, or all of them."""
        if key is None:
            self._cache.clear()
        else:
            self._cache.pop(key, None)

    def _count(self, allowed: bool, label: str) -> None:
        """One handshake's outcome. (Each refusal is also logged, with key and reason, by the
        connection when it closes; verifier problems are logged here, rate-limited.)"""
        if allowed:
            self.counters["admitted"] += 1
        else:
            self.counters["refused"] += 1
            self.refused_by_reason[label] = self.refused_by_reason.get(label, 0) + 1

    def _log_problem(self, kind: str, template: str, key: bytes) -> None:
        # A dead verifier fails every handshake; one line per kind per second names a key and the
        # reason without flooding the log (the counters keep the full tally).
        now = self.clock()
        if now - self._last_log.get(kind, -1e9) >= 1.0:
            self._last_log[kind] = now
            log.warning(template, nodekey_text(key))

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "refused_by_reason": dict(self.refused_by_reason),
            "verifier_errors": dict(self.verifier_errors),
            "lookups_in_flight": len(self._inflight),
            "cache_entries": len(self._cache),
            "allow_keys": len(self._allowed) if self.allow_keys_file else None,
            "checks": [name for name, on in (("allow_keys_file", bool(self.allow_keys_file)),
                                             ("tailscaled", self.verify_clients),
                                             ("verify_url", self._url is not None)) if on],
        }

    # -- allow-keys file ----------------------------------------------------------------------------

    def _maybe_reload(self, now: float) -> None:
        if now - self._allow_checked < 1.0:
            return  # at most one stat() a second, however many handshakes arrive
        self._allow_checked = now
        if self._file_signature() != self._allow_sig:
            self._load_allow_file()

    def _file_signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.allow_keys_file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> None:
        """SIGHUP: re-read the allow-keys file and forget every cached decision, so a node just
        removed from the tailnet (or the file) is re-checked on its next handshake."""
        self.forget()
        if self.allow_keys_file:
            self._load_allow_file()
        log.info("admission reloaded: decision cache cleared")

    def _load_allow_file(self) -> None:
        """Read the allow-keys file. A missing or unreadable file admits nobody (fail closed)."""
        self._allow_checked = self.clock()
        signature = self._file_signature()
        try:
            with open(self.allow_keys_file, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            log.warning("allow-keys file %s unreadable (%s): refusing every client until it is back",
                            self.allow_keys_file, exc.strerror or exc)
            self._allowed = frozenset()
            self._allow_sig = None
            self.counters["allow_keys_reloads"] += 1
            return
        keys, bad = parse_allow_keys(text)
        for lineno, line in bad[:5]:
            log.warning("allow-keys file %s line %d ignored: %r is not nodekey:<64 hex>",
                        self.allow_keys_file, lineno, line[:80])
        if len(bad) > 5:
            log.warning("allow-keys file %s: %d more bad lines ignored", self.allow_keys_file, len(bad) - 5)
        self._allowed = frozenset(keys)
        self._allow_sig = signature
        self.counters["allow_keys_reloads"] += 1
        log.info("allow-keys file %s: %d keys", self.allow_keys_file, len(self._allowed))

    async def aclose(self) -> None:
        """Cancel lookups in flight (worker shutdown); their handshakes are refused. Closes the pools."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for client in (self._localapi_http, self._url_http):
            if client is not None:
                await client.aclose()
        self._localapi_http = self._url_http = None


def parse_allow_keys(text: str) -> tuple[set[bytes], list[tuple[int, str]]]:
    """`nodekey:<hex>` per line; `#` starts a comment; blank lines are fine. Returns (keys, bad lines)."""
    keys: set[bytes] = set()
    bad: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        hexpart = line[len("nodekey:"):] if line.lower().startswith("nodekey:") else ""
        try:
            key = bytes.fromhex(hexpart)
        except ValueError:
            key = b""
        if len(key) != 32:
            bad.append((lineno, raw.strip()))
            continue
        keys.add(key)
    return keys, bad


def install(
    relay: Relay,
    *,
    verify_clients: bool,
    tailscaled_socket: str,
    verify_client_url: str,
    fail_open: bool,
    allow_keys_file: str,
    cache_ttl: float,
    timeout: float,
) -> AdmissionPolicy | None:
    """Build the policy from the admission settings and hook it into relay; None when nothing is on."""
    if not (verify_clients or verify_client_url or allow_keys_file):
        return None
    policy = AdmissionPolicy(
        verify_clients=verify_clients,
        tailscaled_socket=tailscaled_socket,
        verify_client_url=verify_client_url,
        fail_open=fail_open,
        allow_keys_file=allow_keys_file,
        cache_ttl=cache_ttl,
        timeout=timeout,
    )
    relay.admission = policy
    checks = ", ".join(policy.stats()["checks"])
    caching = (f"decisions cached {policy.cache_ttl:g}s (refusals {policy.negative_ttl:g}s, verifier errors "
               f"{policy.error_ttl:g}s)" if policy.cache_ttl > 0 else "every connection checked (no decision cache)")
    log.info("admission on (%s); %s, lookup timeout %gs%s", checks, caching, timeout,
             "" if not verify_client_url else f", verify URL fail-{'open' if fail_open else 'closed'}")
    return policy
