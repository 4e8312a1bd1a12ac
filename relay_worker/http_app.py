"""The ASGI application of a worker: derper's HTTP endpoints and the admin (debug) paths.

Routing is derper's ServeMux (cmd/derper/derper.go), not Starlette's router: paths match exactly,
every method reaches the handler (which decides), and whatever matches nothing is the home page.
DERP and WebSocket DERP upgrades never get here: the HTTP protocol switches them itself
(http_protocol.py); a plain request for /derp gets derper's 426.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable
from html import escape
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .relay import Relay

NO_CACHE = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
CHALLENGE_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

#: tsweb.AddBrowserHeaders
BROWSER_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; "
                               "base-uri 'self'; block-all-mixed-content; object-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"

HOME_PAGE = """<html><body>
<h1>DERP</h1>
<p>
  This is a <a href="https://tailscale.com/">Tailscale</a> DERP server.
</p>

<p>
  It provides STUN, interactive connectivity establishment, and relaying of end-to-end encrypted traffic
  for Tailscale clients.
</p>

<p>
  Documentation:
</p>

<ul>
  <li><a href="https://tailscale.com/kb/1232/derp-servers">About DERP</a></li>
  <li><a href="https://pkg.go.dev/tailscale.com/derp">Protocol & Go docs</a></li>
  <li><a href="https://github.com/tailscale/tailscale/tree/main/cmd/derper#derp">How to run a DERP server</a></li>
</ul>
{status}{debug}
</body>
</html>
"""
#: derper's template with -derp=false
HOME_DISABLED = "\n<p>Status: <b>disabled</b></p>\n"
HOME_DEBUG_LINK = "\n<p>Debug info at <a href='/debug/'>/debug/</a>.</p>\n"

#: Tailscale addresses (tsaddr.IsTailscaleIP): CGNAT minus the ChromeOS VM range, and the ULA /48
_TAILSCALE_V4 = ipaddress.ip_network("100.64.0.0/10")
_CHROMEOS_VM = ipaddress.ip_network("100.115.92.0/23")
_TAILSCALE_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")

#: extra admin documents a process can publish next to the worker's own counters
StatsProvider = Callable[[], Awaitable[dict[str, Any]]]
TextProvider = Callable[[], Awaitable[str]]
Handler = Callable[[Request], Awaitable[Response]]


def http_error(text: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """Go's http.Error: text plus a newline, as text/plain, with nosniff."""
    return Response(text + "\n", status_code=status, media_type=TEXT,
                    headers={"X-Content-Type-Options": "nosniff", **(headers or {})})


def check_home(value: str) -> str:
    """derper's -home: "" (the default page), "blank", or an http(s) URL to redirect to."""
    if value in ("", "blank") or value.startswith(("http://", "https://")):
        return value
    raise ValueError(f"unknown --home value {value!r}: want empty, \"blank\" or an http(s):// URL")


def is_loopback(host: str | None) -> bool:
    if not host:
        return True  # unix-socket callers (the supervisor, `cluster status`) have no address
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_tailscale_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return ip in _TAILSCALE_V4 and ip not in _CHROMEOS_VM
    return ip in _TAILSCALE_V6


def admin_allowed(request: Request, token: str) -> bool:
    """tsweb.AllowDebugAccess, with the admin token in the role of its debug key: the token (Bearer,
    ?token= or ?debugkey=) always works; otherwise any X-Forwarded-For is refused, and loopback,
    Tailscale addresses (100.64.0.0/10, fd7a:115c:a1e0::/48) and the admin unix socket are allowed."""
    if token:
        presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        presented = presented or request.query_params.get("token", "") or request.query_params.get("debugkey", "")
        if presented and hmac.compare_digest(presented.encode(), token.encode()):
            return True
    if "x-forwarded-for" in request.headers:
        return False
    client = request.client.host if request.client else None
    return is_loopback(client) or is_tailscale_ip(client or "")


async def generate_204(request: Request) -> Response:
    """Captive-portal check (also served on the plain-HTTP port): 204, and the challenge answered.
    Any method, as derper's ServeNoContent."""
    headers = {"Cache-Control": NO_CACHE}
    challenge = request.headers.get("x-tailscale-challenge", "")
    if challenge and CHALLENGE_RE.match(challenge):
        headers["X-Tailscale-Response"] = "response " + challenge
    return Response(status_code=204, headers=headers)


def clean_path(path: str) -> str:
    """Go's net/http cleanPath: path.Clean (no "." or ".." segments, no repeated slashes), rooted,
    keeping a trailing slash."""
    if not path:
        return "/"
    if not path.startswith("/"):
        path = "/" + path
    parts: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if parts:
                parts.pop()
            continue
        parts.append(segment)
    cleaned = "/" + "/".join(parts)
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


class App:
    """An ASGI app with derper's routes (see the module docstring)."""

    def __init__(self, routes: dict[str, Handler], fallback: Handler, prefixes: dict[str, Handler]) -> None:
        self.routes = routes
        self.fallback = fallback
        self.prefixes = prefixes
        self.state: Any = type("State", (), {})()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # no lifespan (lifespan="off"), and WebSockets never reach the app
        path = scope["path"]
        cleaned = clean_path(path)
        if cleaned != path and scope["method"] != "CONNECT":
            # ServeMux: 301 to the cleaned path, query kept (http.Redirect's body for GET/HEAD)
            query = scope.get("query_string", b"").decode("latin-1")
            target = cleaned + ("?" + query if query else "")
            body = f'<a href="{escape(target, quote=True)}">Moved Permanently</a>.\n\n'
            response = Response(body if scope["method"] in ("GET", "HEAD") else "", status_code=301,
                                media_type=HTML, headers={"Location": target})
            await response(scope, receive, send)
            return
        handler = self.routes.get(path)
        if handler is None:
            handler = next((h for prefix, h in self.prefixes.items() if path.startswith(prefix)), self.fallback)
        request = Request(scope, receive)
        response = await handler(request)
        await response(scope, receive, send)


def build_app(
    relay: Relay,
    *,
    admin_token: str = "",
    node_stats: StatsProvider | None = None,
    metrics_text: TextProvider | None = None,
    varz_text: TextProvider | None = None,
    vars_json: StatsProvider | None = None,
    home: str = "",
    bootstrap_dns: Any = None,
    derp_enabled: bool = True,
) -> App:
    check_home(home)

    async def home_page(request: Request) -> Response:
        if home == "blank":
            return Response(b"", media_type=HTML, headers=BROWSER_HEADERS)
        if home:
            # http.RedirectHandler(home, 302)
            body = f'<a href="{escape(home, quote=True)}">Found</a>.\n\n' if request.method in ("GET", "HEAD") else ""
            return Response(body, status_code=302, media_type=HTML, headers={**BROWSER_HEADERS, "Location": home})
        debug = HOME_DEBUG_LINK if admin_allowed(request, "") else ""
        status = "" if derp_enabled else HOME_DISABLED
        return Response(HOME_PAGE.format(status=status, debug=debug), media_type=HTML, headers=BROWSER_HEADERS)

    async def robots(request: Request) -> Response:
        return Response("User-agent: *\nDisallow: /\n", media_type=TEXT, headers=BROWSER_HEADERS)

    async def probe(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return http_error("bogus probe method", 405)
        return Response(b"", status_code=200, headers={"Access-Control-Allow-Origin": "*"})

    async def derp_http(request: Request) -> Response:
        if not derp_enabled:  # derper -derp=false: every /derp request, upgrades included
            return http_error("derp server disabled", 404)
        # Upgrades never get here: the HTTP protocol switched them to DerpServerConn already.
        return http_error("DERP requires connection upgrade", 426)

    async def bootstrap(request: Request) -> Response:
        body = b"" if bootstrap_dns is None else bootstrap_dns.answer(
            request.query_params.get("q", ""), request.client.host if request.client else "")
        return Response(body, media_type="application/json",
                        headers={**BROWSER_HEADERS, "Connection": "close"})

    def admin(handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if not admin_allowed(request, admin_token):
                return http_error("debug access denied", 403)
            return await handler(request)

        return guarded

    async def worker_json() -> dict[str, Any]:
        from .metrics import derper_gauges

        snapshot = relay.stats.snapshot()
        snapshot.update(derper_gauges(relay))
        doc: dict[str, Any] = {"worker": snapshot, "clients": len(relay.clients)}
        if node_stats is not None:
            doc.update(await node_stats())
        return doc

    def json_response(doc: Any) -> Response:
        return Response(json.dumps(doc, default=str), media_type="application/json")

    async def varz(request: Request) -> Response:
        if request.client is None or request.query_params.get("local") == "1":
            # the admin unix socket: this worker's JSON, for the supervisor, `cluster status`,
            # node-wide aggregation and the tests (derper's /debug/varz is Prometheus text, below)
            return json_response(await worker_json())
        if varz_text is None:
            from .metrics import derper_gauges, render_derper_varz

            text = render_derper_varz([{**relay.stats.snapshot(), **derper_gauges(relay)}])
        else:
            text = await varz_text()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def expvars(request: Request) -> Response:
        if vars_json is None:
            from .metrics import derper_expvar, derper_gauges

            return json_response(derper_expvar([{**relay.stats.snapshot(), **derper_gauges(relay)}]))
        return json_response(await vars_json())

    async def metrics(request: Request) -> Response:
        if metrics_text is None:
            from .metrics import render_worker_metrics

            text = render_worker_metrics([relay.stats.snapshot()])
        else:
            text = await metrics_text()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def check(request: Request) -> Response:
        return Response("derp.Server ConsistencyCheck okay", media_type=TEXT)

    debug_pages = {"vars": ("Metrics (Go)", expvars), "varz": ("Metrics (Prometheus)", varz),
                   "metrics": ("Metrics (this project's names)", metrics), "check": ("Consistency check", check)}

    async def debug_index(request: Request) -> Response:
        if request.url.path != "/debug/":
            return http_error("404 page not found", 404)
        items = "".join(f'<li><a href="/debug/{name}">/debug/{name}</a> {escape(title)}</li>\n'
                        for name, (title, _) in debug_pages.items())
        page = f"<html><body>\n<h1>DERP debug</h1>\n<ul>\n{items}</ul>\n</body></html>\n"
        return Response(page, media_type=HTML)

    async def debug_redirect(request: Request) -> Response:
        return Response(b"", status_code=301, headers={"Location": "/debug/"})

    routes: dict[str, Handler] = {
        "/robots.txt": robots,
        "/generate_204": generate_204,
        "/derp/probe": probe,
        "/derp/latency-check": probe,
        "/derp": derp_http,
        "/bootstrap-dns": bootstrap,
        "/debug": admin(debug_redirect),
        "/metrics": admin(metrics),
    }
    for name, (_, handler) in debug_pages.items():
        routes[f"/debug/{name}"] = admin(handler)
    app = App(routes, home_page, {"/debug/": admin(debug_index)})
    app.state.relay = relay
    return app
