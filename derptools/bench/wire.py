"""The load generator's DERP client: a raw asyncio Protocol with bulk frame parsing.

relay_worker.client is built on streams and decodes every frame into an object, which is fine for
tests but costs more CPU per packet than the server under test spends: a load generator built on
it measures itself. This one parses a whole read in one loop over the buffer, copies nothing but
the 8-byte timestamp it needs, and answers a batch of received packets with ONE write of a batch of
SendPacket frames (closed loop: every packet that arrives lets its sender put one more in flight).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import nacl.utils
from nacl.public import Box, PrivateKey, PublicKey

from relay_worker import frames as F

_HEADER = struct.Struct(">BI")
_TS = struct.Struct(">q")
_CLIENT_INFO_JSON = json.dumps({"version": F.PROTOCOL_VERSION}, separators=(",", ":")).encode()

UPGRADE, SERVER_KEY, SERVER_INFO, ACTIVE, CLOSED = range(5)


def parse_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise SystemExit(f"cluster bench: only plain http:// DERP URLs are supported (got {url!r}); "
                         "benchmark on loopback without TLS")
    path = parts.path if parts.path not in ("", "/") else "/derp"
    return parts.hostname or "127.0.0.1", parts.port or 80, path


class ClientKey:
    """A client key pair plus NaCl boxes cached per server key.

    Box() does a Curve25519 scalar multiplication; a real client does it once per server too, so
    caching keeps the generator's handshake cost at what a well-behaved client pays, not more.
    """

    __slots__ = ("_boxes", "private", "public")

    def __init__(self, private: PrivateKey | None = None) -> None:
        self.private = private or PrivateKey.generate()
        self.public = bytes(self.private.public_key)
        self._boxes: dict[bytes, Box] = {}

    def box(self, server_public: bytes) -> Box:
        box = self._boxes.get(server_public)
        if box is None:
            box = self._boxes[server_public] = Box(self.private, PublicKey(server_public))
        return box


class BenchConn(asyncio.Protocol):
    """One DERP connection of the load generator.

    After the handshake every RecvPacket is counted; while `measuring` is set its one-way latency
    (now minus the CLOCK_MONOTONIC timestamp the sender put in the first 8 bytes) goes into
    `latency_us`, a histogram in whole microseconds shared by all connections of the process.
    `on_packets(n)` is then called once per read with the number of packets that read carried.
    """

    def __init__(self, key: ClientKey, request: bytes, *, fast_start: bool = False) -> None:
        self.key = key
        self.request = request
        self.state = SERVER_KEY if fast_start else UPGRADE
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.server_public = b""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A handshake that fails after its opener gave up must not log "exception never retrieved".
        self.ready.add_done_callback(_retrieve)
        self.received = 0
        self.peer_gone = 0
        self.measuring = False
        self.latency_us: defaultdict[int, int] | None = None
        self.on_packets: Callable[[int], None] | None = None
        # SendPacket frames toward one destination: the header and key never change, so the
        # frame is prefix + timestamp + padding and a batch of n is one bytes multiplication.
        self.send_prefix = b""
        self.pad = b""

    # -- asyncio Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so a cast, not an isinstance check.
        stream = cast("asyncio.Transport", transport)
        self.transport = stream
        stream.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"server closed the connection during the handshake ({exc})"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if self.state == ACTIVE:
            # The hot loop: parse every complete frame of this read in place.
            if buf:
                buf += data
                view: bytes | bytearray = buf
            else:
                view = data
            pos = 0
            end = len(view)
            count = 0
            unpack = _HEADER.unpack_from
            hist = self.latency_us if self.measuring else None
            now = time.monotonic_ns() if hist is not None else 0
            while end - pos >= 5:
                frame_type, length = unpack(view, pos)
                stop = pos + 5 + length
                if stop > end:
                    break
                if frame_type == F.RECV_PACKET:
                    count += 1
                    if hist is not None and length >= 40:
                        hist[(now - _TS.unpack_from(view, pos + 37)[0]) // 1000] += 1
                elif frame_type == F.PEER_GONE:
                    self.peer_gone += 1
                pos = stop
            if buf:
                del buf[:pos]
            elif pos < end:
                buf += memoryview(data)[pos:]
            if count:
                self.received += count
                if self.on_packets is not None:
                    self.on_packets(count)
            return
        buf += data
        try:
            self._handshake_step()
        except Exception as exc:  # a broken server must fail this connection, not the process
            self.fail(exc)

    # -- handshake ----------------------------------------------------------------------------------

    def _handshake_step(self) -> None:
        buf = self.buf
        if self.state == UPGRADE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(buf[: buf.find(b"\r\n")])
            if b" 101 " not in status_line + b" ":
                raise ConnectionError(f"upgrade refused: {status_line.decode(errors='replace')}")
            del buf[: end + 4]
            self.state = SERVER_KEY
        while len(buf) >= 5 and self.state in (SERVER_KEY, SERVER_INFO):
            frame_type, length = _HEADER.unpack_from(buf, 0)
            if length > F.MAX_INFO_LEN:
                raise ConnectionError(f"handshake frame of {length} bytes")
            if len(buf) < 5 + length:
                return
            payload = bytes(buf[5 : 5 + length])
            del buf[: 5 + length]
            if self.state == SERVER_KEY:
                if frame_type != F.SERVER_KEY:
                    raise ConnectionError(f"expected ServerKey, got frame 0x{frame_type:02x}")
                self.server_public = F.parse_server_key(payload)
                nonce = nacl.utils.random(F.NONCE_LEN)
                sealed = self.key.box(self.server_public).encrypt(_CLIENT_INFO_JSON, nonce).ciphertext
                assert self.transport is not None
                self.transport.write(F.build_client_info(self.key.public, nonce, sealed))
                self.state = SERVER_INFO
            elif frame_type == F.SERVER_INFO:
                nonce, sealed = F.parse_server_info(payload)
                self.key.box(self.server_public).decrypt(sealed, nonce)  # raises if the box is forged
                self.state = ACTIVE
                if not self.ready.done():
                    self.ready.set_result(None)
                if buf:  # frames that came in the same read as ServerInfo
                    rest = bytes(buf)
                    buf.clear()
                    self.data_received(rest)
                return
            # anything else before ServerInfo (a Health frame, say) is skipped

    def fail(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # -- sending ------------------------------------------------------------------------------------

    def aim(self, dst: bytes, size: int) -> None:
        """Prepare SendPacket frames of `size`-byte packets for dst (8 bytes timestamp + padding)."""
        self.send_prefix = _HEADER.pack(F.SEND_PACKET, F.KEY_LEN + size) + dst
        self.pad = b"\x00" * (size - _TS.size)

    def send_batch(self, n: int) -> None:
        transport = self.transport
        if transport is None:
            return
        frame = self.send_prefix + _TS.pack(time.monotonic_ns()) + self.pad
        transport.write(frame * n if n > 1 else frame)

    def send_to(self, dst: bytes, packet: bytes) -> None:
        if self.transport is not None:
            self.transport.write(F.build_send_packet(dst, packet))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


# Written by hand like relay_worker.client's upgrade, for the same reason: the upgraded socket goes on
# as DERP framing inside BenchConn (an asyncio Protocol), and a fast start has no HTTP answer at all.
def upgrade_request(host: str, port: int, path: str, *, fast_start: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: Upgrade", "Upgrade: DERP"]
    if fast_start:
        lines.append("Derp-Fast-Start: 1")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_conn(host: str, port: int, request: bytes, key: ClientKey, *, fast_start: bool = False,
                    timeout: float = 10.0) -> BenchConn:
    """Connect, upgrade and finish the handshake; the returned connection is ACTIVE."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: BenchConn(key, request, fast_start=fast_start), host, port), timeout)
    try:
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout)
    except BaseException:
        conn.fail(ConnectionError("handshake abandoned"))
        raise
    return conn
