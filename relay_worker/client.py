"""An asyncio DERP client: connect over plain upgrade (optionally fast start) or WebSocket, run the
handshake, then send and receive frames. Used by the tests, the mesh, the prober and the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import frames as F
from .frames import Payload
from .handshake import ClientInfo, ServerInfo, open_server_info, seal_client_info
from .keys import PrivateKey


class DerpClientError(Exception):
    """Connecting or talking to a DERP server failed; the message says at which step."""


class UpgradeRefused(DerpClientError):
    def __init__(self, status: int, reason: str, body: bytes) -> None:
        super().__init__(f"DERP port refused the upgrade: {status} {reason} {body[:200]!r}")
        self.status = status
        self.body = body


@dataclass(frozen=True, slots=True)
class RecvPacket:
    src: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerGone:
    key: bytes
    reason: int


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    problem: str


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    frame_type: int
    payload: bytes


Event = RecvPacket | PeerGone | F.PeerPresent | KeepAlive | Ping | Pong | Health | Restarting | UnknownFrame


def decode_event(frame_type: int, payload: Payload) -> Event:
    if frame_type == F.RECV_PACKET:
        return RecvPacket(*F.parse_recv_packet(payload))
    if frame_type == F.PEER_GONE:
        return PeerGone(*F.parse_peer_gone(payload))
    if frame_type == F.PEER_PRESENT:
        return F.parse_peer_present(payload)
    if frame_type == F.KEEP_ALIVE:
        return KeepAlive()
    if frame_type == F.PING:
        return Ping(F.parse_ping(payload))
    if frame_type == F.PONG:
        return Pong(F.parse_pong(payload))
    if frame_type == F.HEALTH:
        return Health(F.parse_health(payload))
    if frame_type == F.RESTARTING:
        return Restarting(*F.parse_restarting(payload))
    return UnknownFrame(frame_type, bytes(payload))


class _StreamIO:
    """Byte stream over an asyncio (optionally TLS) TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(1 << 16)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class _WebSocketIO:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.pending: list[bytes] = []

    async def read(self) -> bytes:
        import websockets

        try:
            message = await self.ws.recv()
        except websockets.ConnectionClosed:
            return b""
        return message if isinstance(message, bytes) else message.encode()

    def write(self, data: bytes) -> None:
        self.pending.append(data)

    async def drain(self) -> None:
        if self.pending:
            batch, self.pending = b"".join(self.pending), []
            await self.ws.send(batch)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()


class DerpClient:
    """One DERP connection. Create with `await DerpClient.connect(url, key)`."""

    def __init__(self, io: _StreamIO | _WebSocketIO, private_key: PrivateKey) -> None:
        self.io = io
        self.private_key = private_key
        self.public_key = private_key.public().raw
        self.parser = F.FrameParser(F.MAX_INFO_LEN)
        self.frames: list[tuple[int, memoryview]] = []
        self.server_public = b""
        self.server_info: ServerInfo | None = None
        self.closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        private_key: PrivateKey | None = None,
        *,
        fast_start: bool = False,
        websocket: bool = False,
        mesh_key: str = "",
        is_prober: bool = False,
        can_ack_pings: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
        extra_headers: dict[str, str] | None = None,
        wait_server_info: bool = True,
        local_addr: tuple[str, int] | None = None,
    ) -> DerpClient:
        key = private_key or PrivateKey.generate()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ws", "wss"):
            raise DerpClientError(f"unsupported URL scheme in {url!r} (want http, https, ws or wss)")
        tls = parts.scheme in ("https", "wss")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if tls else 80)
        path = parts.path if parts.path not in ("", "/") else "/derp"
        ctx = None
        if tls:
            ctx = ssl_context or ssl.create_default_context()
        async with asyncio.timeout(timeout):
            if websocket or parts.scheme.startswith("ws"):
                client = cls(await _open_websocket(parts.scheme, host, port, path, ctx, extra_headers), key)
            else:
                client = cls(await _open_upgrade(host, port, path, ctx, server_hostname, fast_start,
                                                 extra_headers, local_addr), key)
            await client._handshake(ClientInfo(mesh_key=mesh_key, is_prober=is_prober,
                                               can_ack_pings=can_ack_pings), wait_server_info)
        return client

    async def _handshake(self, info: ClientInfo, wait_server_info: bool) -> None:
        frame_type, payload = await self._next_frame()
        if frame_type != F.SERVER_KEY:
            raise DerpClientError(f"expected ServerKey, got frame type 0x{frame_type:02x}")
        # bytes(): the codecs are typed for bytes; the handshake's two frames are copied once per connection
        self.server_public = F.parse_server_key(bytes(payload))
        self.io.write(seal_client_info(self.private_key, self.server_public, info))
        await self.io.drain()
        if wait_server_info:
            frame_type, payload = await self._next_frame()
            if frame_type != F.SERVER_INFO:
                raise DerpClientError(f"expected ServerInfo, got frame type 0x{frame_type:02x}")
            self.server_info = open_server_info(self.private_key, self.server_public, bytes(payload))
            self.parser.max_frame_len = F.MAX_FRAME_LEN

    async def _next_frame(self) -> tuple[int, memoryview]:
        while not self.frames:
            data = await self.io.read()
            if not data:
                self.closed = True
                raise DerpClientError("server closed the connection")
            self.frames.extend(self.parser.feed(data))
        return self.frames.pop(0)

    # -- receiving ----------------------------------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> Event:
        """The next event from the server (ServerInfo, if not awaited at connect, is consumed silently)."""
        async with asyncio.timeout(timeout):
            while True:
                frame_type, payload = await self._next_frame()
                if frame_type == F.SERVER_INFO:
                    self.server_info = open_server_info(self.private_key, self.server_public, bytes(payload))
                    self.parser.max_frame_len = F.MAX_FRAME_LEN
                    continue
                return decode_event(frame_type, payload)

    async def recv_packet(self, timeout: float | None = None) -> RecvPacket:
        """Skip keepalives and control frames until a packet arrives."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.recv()
                if isinstance(event, RecvPacket):
                    return event

    # -- sending ------------------------------------------------------------------------------------

    async def send(self, dst: bytes, packet: bytes) -> None:
        self.io.write(F.build_send_packet(dst, packet))
        await self.io.drain()

    def send_nowait(self, dst: bytes, packet: bytes) -> None:
        self.io.write(F.build_send_packet(dst, packet))

    async def send_raw(self, data: bytes) -> None:
        self.io.write(data)
        await self.io.drain()

    async def flush(self) -> None:
        await self.io.drain()

    async def ping(self, data: bytes) -> None:
        await self.send_raw(F.build_ping(data))

    async def pong(self, data: bytes) -> None:
        await self.send_raw(F.build_pong(data))

    async def note_preferred(self, preferred: bool) -> None:
        await self.send_raw(F.build_note_preferred(preferred))

    async def watch_conns(self) -> None:
        await self.send_raw(F.WATCH_CONNS_FRAME)

    async def close_peer(self, key: bytes) -> None:
        await self.send_raw(F.build_close_peer(key))

    async def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> None:
        await self.send_raw(F.build_forward_packet(src, dst, packet))

    async def close(self) -> None:
        self.closed = True
        await self.io.close()

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# The one HTTP exchange written by hand (every other outgoing call uses httpx): after `Upgrade: DERP`
# the same socket carries DERP frames, read and written through asyncio streams. httpx hands an
# upgraded connection over only as an httpcore network stream after a 101 head, and with
# Derp-Fast-Start the server sends no HTTP answer at all, which no HTTP client accepts.
async def _open_upgrade(host: str, port: int, path: str, ctx: ssl.SSLContext | None, server_hostname: str | None,
                        fast_start: bool, extra_headers: dict[str, str] | None,
                        local_addr: tuple[str, int] | None = None) -> _StreamIO:
    try:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=(server_hostname or host) if ctx else None, limit=1 << 20,
            local_addr=local_addr)
    except OSError as exc:
        raise DerpClientError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: Upgrade", "Upgrade: DERP"]
    if fast_start:
        lines.append("Derp-Fast-Start: 1")
    lines += [f"{name}: {value}" for name, value in (extra_headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    if not fast_start:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            writer.close()
            raise DerpClientError("server closed the connection before answering the upgrade") from exc
        status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = status_line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status != 101:
            body = b""
            with contextlib.suppress(Exception):
                body = await asyncio.wait_for(reader.read(512), 1.0)
            writer.close()
            raise UpgradeRefused(status, parts[2] if len(parts) > 2 else "", body)
    return _StreamIO(reader, writer)


#: what Tailscale's WebSocket client accepts per message (coder/websocket's default read limit):
#: our client is as strict, so a server that sends more fails our tests as it would fail tailscaled
GO_WEBSOCKET_READ_LIMIT = 32 * 1024


async def _open_websocket(scheme: str, host: str, port: int, path: str, ctx: ssl.SSLContext | None,
                          extra_headers: dict[str, str] | None) -> _WebSocketIO:
    import websockets

    ws_scheme = "wss" if scheme in ("https", "wss") else "ws"
    try:
        ws = await websockets.connect(f"{ws_scheme}://{host}:{port}{path}", subprotocols=["derp"],  # type: ignore[list-item]
                                      ssl=ctx, max_size=GO_WEBSOCKET_READ_LIMIT, additional_headers=extra_headers,
                                      ping_interval=None)
    except (OSError, websockets.InvalidHandshake) as exc:
        raise DerpClientError(f"WebSocket connect to {host}:{port} failed: {exc}") from exc
    return _WebSocketIO(ws)
