"""The Starlette application of a worker: derper's HTTP endpoints, WebSocket DERP and admin paths."""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .conn import DerpServerConn
from .relay import Relay
from .websocket_transport import serve_websocket

NO_CACHE = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
CHALLENGE_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

HOME_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DERP</title></head>
<body>
<h1>DERP</h1>
<p>This is a <a href="https://tailscale.com/">Tailscale</a> DERP server (a relay cluster node).</p>
<p>It provides STUN, interactive connectivity establishment, and relaying of end-to-end encrypted
traffic for Tailscale clients.</p>
</body></html>
"""

#: extra admin documents a process can publish next to the worker's own counters
StatsProvider = Callable[[], Awaitable[dict[str, Any]]]


def is_loopback(host: str | None) -> bool:
    if not host:
        return True  # unix-socket callers (the supervisor, `cluster status`) have no address
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_allowed(request: Request, token: str) -> bool:
    """Admin paths answer loopback callers, or anyone presenting the admin token."""
    client = request.client.host if request.client else None
    if is_loopback(client):
        return True
    if not token:
        return False
    presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    presented = presented or request.query_params.get("token", "")
    return hmac.compare_digest(presented.encode(), token.encode())


async def generate_204(request: Request) -> Response:
    """Captive-portal check (also served on the plain-HTTP port): 204, and the challenge answered."""
    headers = {"Cache-Control": NO_CACHE}
    challenge = request.headers.get("x-tailscale-challenge", "")
    if challenge and CHALLENGE_RE.match(challenge):
        headers["X-Tailscale-Response"] = "response " + challenge
    return Response(status_code=204, headers=headers)


def build_app(
    relay: Relay,
    *,
    admin_token: str = "",
    node_stats: StatsProvider | None = None,
    metrics_text: Callable[[], Awaitable[str]] | None = None,
) -> Starlette:
    async def home(request: Request) -> Response:
        return HTMLResponse(HOME_PAGE)

    async def robots(request: Request) -> Response:
        return PlainTextResponse("User-agent: *\nDisallow: /\n")

    async def probe(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return PlainTextResponse("bogus probe method\n", status_code=405)
        return Response(status_code=200, headers={"Access-Control-Allow-Origin": "*"})

    async def derp_http(request: Request) -> Response:
        # Upgrades never get here: the HTTP protocol switched them to DerpServerConn already.
        return PlainTextResponse("DERP requires connection upgrade", status_code=426)

    async def derp_websocket(websocket: WebSocket) -> None:
        protocols = websocket.scope.get("subprotocols") or []
        if "derp" not in protocols:
            await websocket.send_denial_response(PlainTextResponse("unsupported subprotocol", 400))
            return
        await websocket.accept(subprotocol="derp")
        client = websocket.client
        peer = (client.host, client.port) if client else None
        ideal = "ideal-node" not in websocket.headers
        await serve_websocket(websocket, DerpServerConn(relay, peer, ideal_node=ideal, websocket=True))

    async def bootstrap_dns(request: Request) -> Response:
        return JSONResponse({})

    def admin(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            if not admin_allowed(request, admin_token):
                return PlainTextResponse("forbidden: admin paths answer loopback or the admin token\n",
                                         status_code=403)
            return await handler(request)

        return guarded

    async def varz(request: Request) -> Response:
        doc: dict[str, Any] = {"worker": relay.stats.snapshot(), "clients": len(relay.clients)}
        if node_stats is not None:
            doc.update(await node_stats())
        return Response(json.dumps(doc, default=str), media_type="application/json")

    async def metrics(request: Request) -> Response:
        if metrics_text is None:
            from .metrics import render_worker_metrics

            text = render_worker_metrics([relay.stats.snapshot()])
        else:
            text = await metrics_text()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [
        Route("/", home),
        Route("/robots.txt", robots),
        Route("/generate_204", generate_204),
        Route("/derp/probe", probe, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        Route("/derp/latency-check", probe,
              methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        Route("/derp", derp_http),
        WebSocketRoute("/derp", derp_websocket),
        Route("/bootstrap-dns", bootstrap_dns),
        Route("/debug/varz", admin(varz)),
        Route("/metrics", admin(metrics)),
        Route("/debug/metrics", admin(metrics)),
    ]
    app = Starlette(routes=routes)
    app.state.relay = relay
    return app
