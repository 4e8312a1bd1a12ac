"""The plain-HTTP port (`server.http_port`, derper's `-http-port`, usually 80) beside a TLS DERP port.

Tailscale clients probe `http://HOST/generate_204` for captive portals, and that check must work
without TLS. Like derper, the port answers /generate_204 itself and sends every other GET/HEAD to
the HTTPS address (302); other methods get 400 "Use HTTPS". It is only served when the DERP port
serves TLS: in certmode dev the DERP port is plain HTTP already and answers /generate_204 itself.

Each worker binds the port with SO_REUSEPORT (as it does the DERP port) and serves it with a second
small uvicorn server in its own event loop; no extra process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import Generator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from relay_worker.http_app import generate_204
from relay_worker.http_protocol import protocol_class_for
from relay_worker.server import make_listen_socket

from .config import Config, ConfigError
from .ports import check_port_free

#: set by the supervisor for its workers in certmode letsencrypt: where HTTP-01 answers are
ACME_DIR_ENV = "CLUSTER_ACME_HTTP01_DIR"
#: ACME tokens are base64url (RFC 8555 section 8.1); nothing else may name a file
_ACME_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def http_port_wanted(config: Config) -> int | None:
    """The plain-HTTP port to serve, or None (off, or the DERP port is plain HTTP already)."""
    port = int(config.values["server.http_port"])
    if port < 0 or not config.tls:
        return None
    return port


def check_http_port(config: Config) -> None:
    """For the supervisor before it starts workers: fail with one line if the port is taken."""
    port = http_port_wanted(config)
    if port is None:
        return
    host = config.listen_addr[0]
    if port == 0:
        raise ConfigError("server.http_port (--http-port): workers share the port, so it cannot be 0; "
                          "use 80, another port, or -1 for off")
    if port == config.listen_addr[1]:
        raise ConfigError(f"server.http_port (--http-port): {port} is the DERP port too; pick another "
                          "(usually 80) or -1 for off")
    check_port_free(host, port, setting="server.http_port (--http-port)",
                    fix="free it, pick another port, or -1 for off")


def open_http_port(config: Config) -> socket.socket | None:
    """The listening socket for the plain-HTTP port of this worker, or None when not wanted."""
    port = http_port_wanted(config)
    if port is None:
        return None
    return make_listen_socket(config.listen_addr[0], port)


def build_port80_app(hostname: str, https_port: int, acme_dir: Path | None = None) -> Starlette:
    """/generate_204 as on the DERP port; ACME HTTP-01 answers from acme_dir (certmode letsencrypt,
    written by the supervisor's cluster/acme.py, which names it to workers in ACME_DIR_ENV);
    everything else points at the HTTPS address."""
    if acme_dir is None and os.environ.get(ACME_DIR_ENV):
        acme_dir = Path(os.environ[ACME_DIR_ENV])

    async def acme_challenge(request: Request) -> Response:
        token = request.path_params["token"]
        if acme_dir is None or not _ACME_TOKEN.fullmatch(token):
            return await to_https(request)
        try:
            body = (acme_dir / token).read_bytes()
        except OSError:
            return PlainTextResponse("no such challenge\n", status_code=404)
        return Response(body, media_type="text/plain")

    async def to_https(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return PlainTextResponse("Use HTTPS\n", status_code=400)
        host = hostname or (request.url.hostname or "localhost")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        port = "" if https_port == 443 else f":{https_port}"
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"https://{host}{port}{path}", status_code=302)

    return Starlette(routes=[
        Route("/generate_204", generate_204, methods=_ALL_METHODS),
        Route("/.well-known/acme-challenge/{token}", acme_challenge, methods=["GET", "HEAD"]),
        Route("/{path:path}", to_https, methods=_ALL_METHODS),
    ])


class _QuietServer(uvicorn.Server):
    # The worker's own WorkerServer owns SIGTERM/SIGINT (it drains DERP clients); a second
    # server installing handlers would steal them, so side servers never touch signals.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class SideServer:
    """A plain (never TLS) uvicorn server on given sockets, run as a task in the worker's loop."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        self.server = _QuietServer(config)
        self.sockets = sockets
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=self.sockets),
                                                            name="side-server")
        # Wait until uvicorn listens (or fails), so the caller knows the sockets answer.
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises what made the server fail to start

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, SystemExit):
                await self._task
            self._task = None
        for sock in self.sockets:
            sock.close()


def port80_server(config: Config, sock: socket.socket) -> SideServer:
    app = build_port80_app(config.values["server.hostname"], config.listen_addr[1])
    # the worker's bounded HTTP protocol (request-head limits, deadlines), without DERP
    read_timeout = float(config.values["limits.http_read_timeout"])
    uv = uvicorn.Config(app, http=protocol_class_for(None, read_timeout=read_timeout), ws="none",
                        lifespan="off", loop="none", log_level=config.log_level, access_log=False,
                        server_header=False, timeout_keep_alive=int(max(1, read_timeout)),
                        timeout_graceful_shutdown=2)
    return SideServer(uv, [sock])


class SideServers:
    """What a worker serves next to its DERP port, outside uvicorn's TLS.

    uvicorn puts its ssl context on every socket a server serves, so with TLS on the DERP port the
    admin unix socket (the supervisor's readiness check, `cluster status`) must move to a plain
    server of its own; the plain-HTTP port (server.http_port) is another one.
    """

    def __init__(self, servers: list[SideServer]) -> None:
        self.servers = servers

    @classmethod
    async def start(cls, config: Config, uvicorn_config: uvicorn.Config | None = None,
                    admin_sock: socket.socket | None = None) -> SideServers:
        """Serve admin_sock with uvicorn_config (the worker's own app and DERP protocol, no ssl) if
        given, and the plain-HTTP port if the config asks for it."""
        servers: list[SideServer] = []
        if admin_sock is not None and uvicorn_config is not None:
            servers.append(SideServer(uvicorn_config, [admin_sock]))
        sock = open_http_port(config)
        if sock is not None:
            servers.append(port80_server(config, sock))
        started = cls([])
        try:
            for server in servers:
                await server.start()
                started.servers.append(server)
        except BaseException:
            await started.stop()
            raise
        return started

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        self.servers = []
