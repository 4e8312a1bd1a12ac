"""A minimal DERP client written to Tailscale's protocol as its Go source implements it.

Independent of this project on purpose (stdlib + PyNaCl + `websockets` only), so a test can show
that "a client written to Tailscale's protocol, not ours" connects and relays. Where each behaviour
comes from (tailscale/tailscale):

- Frame layout, type numbers, magic, MaxPacketSize, ProtocolVersion, PeerGone reasons, PeerPresent
  flags, the Derp-Fast-Start / Ideal-Node header names: derp/derp.go.
- Upgrade request: derp/derphttp/derphttp_client.go `connect` builds `http.NewRequest("GET", url)`
  with `Upgrade: DERP` and `Connection: Upgrade`, plus `Derp-Fast-Start: 1` only when the server key
  is already known (from the TLS meta cert) and `Ideal-Node: <Nodes[0].Name>` when not on the
  region's first node. Go's `Request.Write` emits Host, then `User-Agent: Go-http-client/1.1`, then
  the other headers sorted by name; `build_upgrade_request` reproduces those bytes. Without fast
  start the client requires a 101 (status only, headers are not checked) before speaking DERP.
- Handshake: derp/derp_client.go `recvServerKey` (frame <= 1 KiB, >= 40 bytes, magic), then
  `sendClientKey`: pubkey(32) + nonce(24) + box(json) where the JSON is `derp.ClientInfo` marshalled
  in field order meshKey (omitted if empty), version, CanAckPings (always present), IsProber (omitted
  if false). With a known server key (fast start) the Go client skips `recvServerKey` and `Recv`
  later skips the ServerKey frame as an unknown type. ServerInfo is not awaited by the Go client; it
  is parsed inside `Recv` (24 <= len <= 24 + 1 MiB) and its TokenBucket fields set a send limiter.
- After connecting, derphttp sends NotePreferred(true) if preferred, then WatchConns if
  `WatchConnectionChanges` is set (mesh clients, derp/derphttp/mesh_client.go).
- Recv (derp_client.go): frames over 1 MiB are fatal, unknown types and short frames are skipped,
  120 s read deadline. Pings are not answered by the derp client itself; magicsock
  (wgengine/magicsock/derp.go) answers each Ping with a Pong (`auto_pong=True` does the same).
- WebSocket: derp/derphttp/websocket.go dials with subprotocol "derp" (coder/websocket, binary
  messages, no compression, no keepalive pings) and speaks the same byte stream; no fast start,
  no Ideal-Node there.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import json
import os
import re
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"DERP\xf0\x9f\x94\x91"
PROTOCOL_VERSION = 2
KEY_LEN, NONCE_LEN, FRAME_HEADER_LEN = 32, 24, 5
MAX_PACKET_SIZE = 64 << 10
MAX_INFO_LEN = 1 << 20
MAX_RECV_FRAME = 1 << 20
RECV_TIMEOUT = 120.0
GO_USER_AGENT = "Go-http-client/1.1"

(SERVER_KEY, CLIENT_INFO, SERVER_INFO, SEND_PACKET, RECV_PACKET, KEEP_ALIVE, NOTE_PREFERRED,
 PEER_GONE, PEER_PRESENT, FORWARD_PACKET) = (1, 2, 3, 4, 5, 6, 7, 8, 9, 0x0A)
WATCH_CONNS, CLOSE_PEER, PING, PONG, HEALTH, RESTARTING = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15
PEER_GONE_DISCONNECTED, PEER_GONE_NOT_HERE = 0x00, 0x01
PRESENT_REGULAR, PRESENT_MESH_PEER, PRESENT_PROBER, PRESENT_NOT_IDEAL = 1, 2, 4, 8

_HDR = struct.Struct(">BI")


class DerpProtocolError(Exception):
    """The server broke the protocol as derp_client.go checks it."""


class DerpConnectionClosed(EOFError):
    """The server closed the connection."""


@dataclass(frozen=True)
class RecvPacket:
    src: bytes
    data: bytes


@dataclass(frozen=True)
class PeerGone:
    key: bytes
    reason: int


@dataclass(frozen=True)
class PeerPresent:
    key: bytes
    ip_port: tuple[str, int] | None = None
    flags: int | None = None


@dataclass(frozen=True)
class KeepAlive:
    pass


@dataclass(frozen=True)
class Ping:
    data: bytes


@dataclass(frozen=True)
class Pong:
    data: bytes


@dataclass(frozen=True)
class Health:
    problem: str


@dataclass(frozen=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True)
class ServerInfo:
    info: dict[str, Any]


Message = RecvPacket | PeerGone | PeerPresent | KeepAlive | Ping | Pong | Health | Restarting | ServerInfo


# ---- pure helpers (unit-tested without a server) ----

def frame(ftype: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(ftype, len(payload)) + payload


def parse_frame_header(header: bytes) -> tuple[int, int]:
    ftype, length = _HDR.unpack(header)
    return ftype, length


def build_upgrade_request(host_header: str, path: str = "/derp", *, fast_start: bool = False,
                          ideal_node: str | None = None) -> bytes:
    """The bytes Go's http.Request.Write puts on the wire for derphttp's upgrade GET."""
    headers = {"Connection": "Upgrade", "Upgrade": "DERP"}
    if fast_start:
        headers["Derp-Fast-Start"] = "1"
    if ideal_node:
        headers["Ideal-Node"] = ideal_node
    lines = [f"GET {path} HTTP/1.1", f"Host: {host_header}", f"User-Agent: {GO_USER_AGENT}"]
    lines += [f"{k}: {headers[k]}" for k in sorted(headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_server_key(payload: bytes) -> bytes:
    """derp_client.go recvServerKey: >= 40 bytes, the magic, then the key; extra bytes ignored."""
    if len(payload) < len(MAGIC) + KEY_LEN or payload[: len(MAGIC)] != MAGIC:
        raise DerpProtocolError("invalid server greeting")
    return payload[len(MAGIC) : len(MAGIC) + KEY_LEN]


def check_mesh_key(mesh_key: str) -> str:
    """key.ParseDERPMesh: 64 hex digits after trimming; marshalled back as lowercase hex."""
    k = mesh_key.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", k):
        raise ValueError("mesh key must be a 64-digit hexadecimal number")
    return k.lower()


def client_info_json(*, mesh_key: str | None = None, can_ack_pings: bool = True,
                     is_prober: bool = False) -> bytes:
    """json.Marshal(derp.ClientInfo{...}): Go field order, omitempty rules, compact separators."""
    info: dict[str, Any] = {}
    if mesh_key:
        info["meshKey"] = check_mesh_key(mesh_key)
    info["version"] = PROTOCOL_VERSION
    info["CanAckPings"] = can_ack_pings
    if is_prober:
        info["IsProber"] = True
    return json.dumps(info, separators=(",", ":")).encode()


def seal(priv: PrivateKey, peer_pub: bytes, msg: bytes, nonce: bytes | None = None) -> bytes:
    """key.NodePrivate.SealTo: nonce(24) || nacl box (16-byte tag + ciphertext)."""
    return bytes(Box(priv, PublicKey(peer_pub)).encrypt(msg, nonce or os.urandom(NONCE_LEN)))


def build_client_info(priv: PrivateKey, server_pub: bytes, info_json: bytes,
                      nonce: bytes | None = None) -> bytes:
    """ClientInfo frame payload: our pubkey(32) + nonce(24) + box(json)."""
    return bytes(priv.public_key) + seal(priv, server_pub, info_json, nonce)


def open_server_info(priv: PrivateKey, server_pub: bytes, payload: bytes) -> dict[str, Any]:
    if len(payload) < NONCE_LEN:
        raise DerpProtocolError("short serverInfo frame")
    if len(payload) > NONCE_LEN + MAX_INFO_LEN:
        raise DerpProtocolError("long serverInfo frame")
    try:
        msg = Box(priv, PublicKey(server_pub)).decrypt(payload)
    except Exception as e:
        raise DerpProtocolError("failed to open naclbox from server key") from e
    return json.loads(msg)


def parse_message(ftype: int, b: bytes, priv: PrivateKey | None = None,
                  server_pub: bytes | None = None) -> Message | None:
    """One server frame as derp_client.go Recv sees it; None means Recv skips it."""
    n = len(b)
    if ftype == SERVER_INFO and priv is not None and server_pub is not None:
        return ServerInfo(open_server_info(priv, server_pub, b))
    if ftype == KEEP_ALIVE:
        return KeepAlive()
    if ftype == PEER_GONE and n >= KEY_LEN:
        return PeerGone(b[:KEY_LEN], b[KEY_LEN] if n > KEY_LEN else PEER_GONE_DISCONNECTED)
    if ftype == PEER_PRESENT and n >= KEY_LEN:
        if n < KEY_LEN + 18:
            return PeerPresent(b[:KEY_LEN])
        ip = ipaddress.IPv6Address(b[KEY_LEN : KEY_LEN + 16])
        addr = str(ip.ipv4_mapped or ip)
        port = int.from_bytes(b[KEY_LEN + 16 : KEY_LEN + 18], "big")
        return PeerPresent(b[:KEY_LEN], (addr, port), b[KEY_LEN + 18] if n > KEY_LEN + 18 else None)
    if ftype == RECV_PACKET and n >= KEY_LEN:
        return RecvPacket(b[:KEY_LEN], b[KEY_LEN:])
    if ftype == PING and n >= 8:
        return Ping(b[:8])
    if ftype == PONG and n >= 8:
        return Pong(b[:8])
    if ftype == HEALTH:
        return Health(b.decode("utf-8", errors="replace"))
    if ftype == RESTARTING and n >= 8:
        return Restarting(*struct.unpack(">II", b[:8]))
    return None


def _key(k: bytes | PublicKey) -> bytes:
    raw = bytes(k)
    if len(raw) != KEY_LEN:
        raise ValueError("keys are 32 bytes")
    return raw


# ---- transports: one byte stream either way ----

class _TCPStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def read_exactly(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise DerpConnectionClosed(str(e)) from e

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class _WSStream:
    def __init__(self, ws: Any):
        self.ws, self.buf = ws, bytearray()

    async def read_exactly(self, n: int) -> bytes:
        from websockets.exceptions import ConnectionClosed

        while len(self.buf) < n:
            try:
                msg = await self.ws.recv()
            except ConnectionClosed as e:
                raise DerpConnectionClosed(str(e)) from e
            if isinstance(msg, str):
                raise DerpProtocolError("text WebSocket message; DERP uses binary messages")
            self.buf += msg
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()


class TailscaleDerpClient:
    """One DERP connection; build it with `await TailscaleDerpClient.connect(...)`."""

    def __init__(self, stream: _TCPStream | _WSStream, priv: PrivateKey, auto_pong: bool):
        self._stream, self.private_key, self.auto_pong = stream, priv, auto_pong
        self.public_key = bytes(priv.public_key)
        self.server_public_key = b""
        self.server_info: dict[str, Any] | None = None
        self.response_headers: dict[str, str] = {}
        self.subprotocol: str | None = None
        self._pending: deque[Message] = deque()
        self._wlock = asyncio.Lock()
        self._bucket: tuple[float, float, float, float] | None = None  # rate, burst, tokens, last

    @classmethod
    async def connect(cls, host: str, port: int, *, private_key: PrivateKey | None = None,
                      websocket: bool = False, fast_start: bool = False,
                      server_public_key: bytes | None = None, mesh_key: str | None = None,
                      can_ack_pings: bool = True, is_prober: bool = False,
                      ideal_node: str | None = None, preferred: bool = False,
                      watch_conns: bool = False, wait_server_info: bool = True,
                      auto_pong: bool = False, path: str = "/derp", ssl: Any = None,
                      timeout: float = 10.0) -> TailscaleDerpClient:
        priv = private_key or PrivateKey.generate()
        info_json = client_info_json(mesh_key=mesh_key, can_ack_pings=can_ack_pings, is_prober=is_prober)
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        async with asyncio.timeout(timeout):  # derphttp: 10 s for dial + upgrade + DERP handshake
            if websocket:
                from websockets.asyncio.client import connect as ws_connect

                kw: dict[str, Any] = {"ssl": ssl} if ssl else {}
                if "proxy" in inspect.signature(ws_connect).parameters:
                    kw["proxy"] = None  # websockets >= 15 would otherwise honour *_PROXY env vars
                ws = await ws_connect(f"{'wss' if ssl else 'ws'}://{hostport}{path}", subprotocols=["derp"],
                                      compression=None, ping_interval=None, max_size=None,
                                      open_timeout=None, **kw)
                c = cls(_WSStream(ws), priv, auto_pong)
                c.subprotocol = ws.subprotocol
            else:
                reader, writer = await asyncio.open_connection(host, port, ssl=ssl)
                c = cls(_TCPStream(reader, writer), priv, auto_pong)
            try:
                if not websocket:
                    req = build_upgrade_request(host if port == (443 if ssl else 80) else hostport, path,
                                                fast_start=fast_start, ideal_node=ideal_node)
                    if fast_start and server_public_key:
                        # Go: request + ClientInfo leave in one flush; Recv later skips the ServerKey.
                        c.server_public_key = _key(server_public_key)
                        req += frame(CLIENT_INFO, build_client_info(priv, c.server_public_key, info_json))
                    await c._write(req)
                    if not fast_start:
                        await c._read_101(reader)
                if not c.server_public_key:
                    ftype, payload = await c._read_frame(max_len=1 << 10)
                    if ftype != SERVER_KEY:
                        raise DerpProtocolError("invalid server greeting")
                    c.server_public_key = parse_server_key(payload)
                    ci = build_client_info(priv, c.server_public_key, info_json)
                    await c._write(frame(CLIENT_INFO, ci))
                if preferred:
                    await c.note_preferred(True)
                if watch_conns:
                    await c.watch_conns()
                while wait_server_info and c.server_info is None:
                    m = await c._recv_one()
                    if m is not None and not isinstance(m, ServerInfo):
                        c._pending.append(m)
            except BaseException:
                await c.close()
                raise
        return c

    async def _read_101(self, reader: asyncio.StreamReader) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise DerpProtocolError("bad HTTP response to upgrade") from e
        status, *lines = head.decode("latin-1").split("\r\n")
        for line in lines:
            if ":" in line:
                k, v = line.split(":", 1)
                self.response_headers[k.strip().lower()] = v.strip()
        parts = status.split(" ", 2)
        if len(parts) < 2 or parts[1] != "101":
            body = b""
            with contextlib.suppress(Exception):
                body = await asyncio.wait_for(reader.read(4096), 1.0)
            raise DerpProtocolError(f"GET failed: {status}: {body.decode('utf-8', 'replace')}")

    async def _read_frame(self, max_len: int = MAX_RECV_FRAME) -> tuple[int, bytes]:
        ftype, length = parse_frame_header(await self._stream.read_exactly(FRAME_HEADER_LEN))
        if length > max_len:
            raise DerpProtocolError(f"unexpectedly large frame of {length} bytes returned")
        return ftype, await self._stream.read_exactly(length) if length else b""

    async def _recv_one(self) -> Message | None:
        ftype, payload = await self._read_frame()
        m = parse_message(ftype, payload, self.private_key, self.server_public_key)
        if isinstance(m, ServerInfo):
            self.server_info = m.info
            rate, burst = m.info.get("TokenBucketBytesPerSecond", 0), m.info.get("TokenBucketBytesBurst", 0)
            self._bucket = (float(rate), float(burst), float(burst), time.monotonic()) if rate else None
        elif isinstance(m, Ping) and self.auto_pong:
            await self.send_pong(m.data)
        return m

    async def recv(self, timeout: float | None = RECV_TIMEOUT) -> Message:
        """Next message; skips what derp_client.go Recv skips. TimeoutError after `timeout` s."""
        if self._pending:
            return self._pending.popleft()
        async with asyncio.timeout(timeout):
            while True:
                m = await self._recv_one()
                if m is not None:
                    return m

    async def _write(self, data: bytes) -> None:
        async with self._wlock:
            await self._stream.write(data)

    def _allow(self, n: int) -> bool:
        if self._bucket is None:
            return True
        rate, burst, tokens, last = self._bucket
        now = time.monotonic()
        tokens = min(burst, tokens + (now - last) * rate)
        ok = tokens >= n
        self._bucket = (rate, burst, tokens - n if ok else tokens, now)
        return ok

    async def send_packet(self, dst: bytes | PublicKey, data: bytes) -> bool:
        """SendPacket; False if the ServerInfo token bucket dropped it (as derp_client.go does)."""
        if len(data) > MAX_PACKET_SIZE:
            raise ValueError(f"packet too big: {len(data)}")
        if not self._allow(FRAME_HEADER_LEN + KEY_LEN + len(data)):
            return False
        await self._write(frame(SEND_PACKET, _key(dst) + data))
        return True

    async def forward_packet(self, src: bytes | PublicKey, dst: bytes | PublicKey, data: bytes) -> None:
        if len(data) > MAX_PACKET_SIZE:
            raise ValueError(f"packet too big: {len(data)}")
        await asyncio.wait_for(self._write(frame(FORWARD_PACKET, _key(src) + _key(dst) + data)), 5.0)

    async def send_ping(self, data: bytes) -> None:
        if len(data) != 8:
            raise ValueError("ping payload is 8 bytes")
        await self._write(frame(PING, data))

    async def send_pong(self, data: bytes) -> None:
        if len(data) != 8:
            raise ValueError("pong payload is 8 bytes")
        await self._write(frame(PONG, data))

    async def note_preferred(self, preferred: bool) -> None:
        await self._write(frame(NOTE_PREFERRED, b"\x01" if preferred else b"\x00"))

    async def watch_conns(self) -> None:
        await self._write(frame(WATCH_CONNS))

    async def close_peer(self, key: bytes | PublicKey) -> None:
        await self._write(frame(CLOSE_PEER, _key(key)))

    async def send_raw(self, data: bytes) -> None:
        """Write arbitrary bytes (for negative tests against a server)."""
        await self._write(data)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.close()

    async def __aenter__(self) -> TailscaleDerpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


connect = TailscaleDerpClient.connect
