"""DERP frame codec: pure functions over bytes, no I/O.

Every frame is 1 byte type + 4 byte big-endian payload length + payload. Builders return the whole
frame as bytes; payload parsers take the payload and return plain values or raise ProtocolError.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

#: what a frame's payload is on the hot path: a zero-copy view into a read, or bytes
Payload: TypeAlias = bytes | memoryview

MAGIC = b"DERP\xf0\x9f\x94\x91"
PROTOCOL_VERSION = 2
KEY_LEN = 32
NONCE_LEN = 24
HEADER_LEN = 5
MAX_PACKET_SIZE = 64 << 10
MAX_INFO_LEN = 256 << 10
MAX_PING_LEN = 1000
PING_LEN = 8
#: the largest frame any peer may send after the handshake (ForwardPacket: two keys + packet)
MAX_FRAME_LEN = 2 * KEY_LEN + MAX_PACKET_SIZE
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"
DISCO_MIN_LEN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN

SERVER_KEY = 0x01
CLIENT_INFO = 0x02
SERVER_INFO = 0x03
SEND_PACKET = 0x04
RECV_PACKET = 0x05
KEEP_ALIVE = 0x06
NOTE_PREFERRED = 0x07
PEER_GONE = 0x08
PEER_PRESENT = 0x09
FORWARD_PACKET = 0x0A
WATCH_CONNS = 0x10
CLOSE_PEER = 0x11
PING = 0x12
PONG = 0x13
HEALTH = 0x14
RESTARTING = 0x15

FRAME_NAMES = {
    SERVER_KEY: "ServerKey",
    CLIENT_INFO: "ClientInfo",
    SERVER_INFO: "ServerInfo",
    SEND_PACKET: "SendPacket",
    RECV_PACKET: "RecvPacket",
    KEEP_ALIVE: "KeepAlive",
    NOTE_PREFERRED: "NotePreferred",
    PEER_GONE: "PeerGone",
    PEER_PRESENT: "PeerPresent",
    FORWARD_PACKET: "ForwardPacket",
    WATCH_CONNS: "WatchConns",
    CLOSE_PEER: "ClosePeer",
    PING: "Ping",
    PONG: "Pong",
    HEALTH: "Health",
    RESTARTING: "Restarting",
}

PEER_GONE_DISCONNECTED = 0x00
PEER_GONE_NOT_HERE = 0x01

PEER_PRESENT_IS_REGULAR = 0x01
PEER_PRESENT_IS_MESH_PEER = 0x02
PEER_PRESENT_IS_PROBER = 0x04
PEER_PRESENT_NOT_IDEAL = 0x08

#: the frame types derper's server handles; every other type is skipped, whatever its length
SERVER_HANDLED_TYPES = frozenset({NOTE_PREFERRED, SEND_PACKET, FORWARD_PACKET, WATCH_CONNS, CLOSE_PEER, PING})

_HEADER = struct.Struct(">BI")
_U32X2 = struct.Struct(">II")


class ProtocolError(Exception):
    """The peer broke the DERP protocol; the connection that sent it must be closed."""


# -- builders -------------------------------------------------------------------------------------


def frame_header(frame_type: int, length: int) -> bytes:
    return _HEADER.pack(frame_type, length)


def build_frame(frame_type: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(frame_type, len(payload)) + payload


def build_server_key(server_public: bytes) -> bytes:
    return build_frame(SERVER_KEY, MAGIC + server_public)


def build_client_info(client_public: bytes, nonce: bytes, sealed: bytes) -> bytes:
    return build_frame(CLIENT_INFO, client_public + nonce + sealed)


def build_server_info(nonce: bytes, sealed: bytes) -> bytes:
    return build_frame(SERVER_INFO, nonce + sealed)


def build_send_packet(dst: bytes, packet: bytes) -> bytes:
    if len(packet) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(packet)} bytes exceeds the DERP maximum {MAX_PACKET_SIZE}")
    return _HEADER.pack(SEND_PACKET, KEY_LEN + len(packet)) + dst + packet


def build_recv_packet(src: bytes, packet: bytes) -> bytes:
    return _HEADER.pack(RECV_PACKET, KEY_LEN + len(packet)) + src + packet


def build_forward_packet(src: bytes, dst: bytes, packet: Payload) -> bytes:
    if len(packet) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(packet)} bytes exceeds the DERP maximum {MAX_PACKET_SIZE}")
    return _HEADER.pack(FORWARD_PACKET, 2 * KEY_LEN + len(packet)) + src + dst + packet


KEEP_ALIVE_FRAME = build_frame(KEEP_ALIVE)
WATCH_CONNS_FRAME = build_frame(WATCH_CONNS)


def build_note_preferred(preferred: bool) -> bytes:
    return build_frame(NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def build_peer_gone(peer: bytes, reason: int = PEER_GONE_DISCONNECTED) -> bytes:
    return build_frame(PEER_GONE, peer + bytes((reason,)))


def build_peer_present(
    peer: bytes, ip: bytes | None = None, port: int = 0, flags: int | None = None
) -> bytes:
    """PeerPresent: key, then optionally a 16-byte IP (v4-mapped for IPv4) + port, then flags."""
    payload = peer
    if ip is not None or flags is not None:
        ip16 = ip if ip is not None else bytes(16)
        if len(ip16) != 16:
            raise ValueError("PeerPresent ip must be 16 bytes (IPv4-mapped for IPv4)")
        payload += ip16 + struct.pack(">H", port)
        if flags is not None:
            payload += bytes((flags,))
    return build_frame(PEER_PRESENT, payload)


def build_close_peer(peer: bytes) -> bytes:
    return build_frame(CLOSE_PEER, peer)


def build_ping(data: bytes) -> bytes:
    if len(data) != PING_LEN:
        raise ValueError("ping payload must be 8 bytes")
    return build_frame(PING, data)


def build_pong(data: bytes) -> bytes:
    return build_frame(PONG, data[:PING_LEN])


def build_health(problem: str) -> bytes:
    return build_frame(HEALTH, problem.encode())


def build_restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return build_frame(RESTARTING, _U32X2.pack(reconnect_in_ms, try_for_ms))


# -- payload parsers ------------------------------------------------------------------------------


def parse_server_key(payload: Payload) -> bytes:
    """Return the server's public key from a ServerKey payload (trailing bytes are for future use)."""
    if len(payload) < len(MAGIC) + KEY_LEN:
        raise ProtocolError(f"ServerKey frame too short ({len(payload)} bytes)")
    if payload[: len(MAGIC)] != MAGIC:
        raise ProtocolError("ServerKey frame has the wrong magic")
    return bytes(payload[len(MAGIC) : len(MAGIC) + KEY_LEN])


def parse_client_info(payload: Payload) -> tuple[bytes, bytes, bytes]:
    """Split ClientInfo into (client public key, nonce, sealed box)."""
    if len(payload) > MAX_INFO_LEN:
        raise ProtocolError(f"ClientInfo of {len(payload)} bytes exceeds {MAX_INFO_LEN}")
    if len(payload) < KEY_LEN + NONCE_LEN:
        raise ProtocolError(f"ClientInfo frame too short ({len(payload)} bytes)")
    return (
        bytes(payload[:KEY_LEN]),
        bytes(payload[KEY_LEN : KEY_LEN + NONCE_LEN]),
        bytes(payload[KEY_LEN + NONCE_LEN :]),
    )


def parse_server_info(payload: Payload) -> tuple[bytes, bytes]:
    if len(payload) < NONCE_LEN:
        raise ProtocolError(f"ServerInfo frame too short ({len(payload)} bytes)")
    return bytes(payload[:NONCE_LEN]), bytes(payload[NONCE_LEN:])


def parse_send_packet(payload: Payload) -> tuple[bytes, bytes]:
    """Return (dst, packet) of a SendPacket payload."""
    if len(payload) < KEY_LEN:
        raise ProtocolError("SendPacket frame shorter than a key")
    if len(payload) > KEY_LEN + MAX_PACKET_SIZE:
        raise ProtocolError(f"SendPacket of {len(payload) - KEY_LEN} bytes exceeds {MAX_PACKET_SIZE}")
    return bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:])


def parse_recv_packet(payload: Payload) -> tuple[bytes, bytes]:
    """Return (src, packet) of a v2 RecvPacket payload."""
    if len(payload) < KEY_LEN:
        raise ProtocolError("RecvPacket frame shorter than a key")
    return bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:])


def parse_forward_packet(payload: Payload) -> tuple[bytes, bytes, bytes]:
    """Return (src, dst, packet) of a ForwardPacket payload."""
    if len(payload) < 2 * KEY_LEN:
        raise ProtocolError("ForwardPacket frame shorter than two keys")
    if len(payload) > 2 * KEY_LEN + MAX_PACKET_SIZE:
        raise ProtocolError("ForwardPacket exceeds the maximum packet size")
    return bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN : 2 * KEY_LEN]), bytes(payload[2 * KEY_LEN :])


def parse_note_preferred(payload: Payload) -> bool:
    if len(payload) < 1:
        raise ProtocolError("NotePreferred frame is empty")
    return payload[0] != 0


def parse_peer_gone(payload: Payload) -> tuple[bytes, int]:
    """Return (peer, reason); a bare key (old servers) means disconnected."""
    if len(payload) < KEY_LEN:
        raise ProtocolError("PeerGone frame shorter than a key")
    reason = payload[KEY_LEN] if len(payload) > KEY_LEN else PEER_GONE_DISCONNECTED
    return bytes(payload[:KEY_LEN]), reason


@dataclass(frozen=True, slots=True)
class PeerPresent:
    key: bytes
    ip: bytes | None = None
    port: int = 0
    flags: int = 0


def parse_peer_present(payload: Payload) -> PeerPresent:
    if len(payload) < KEY_LEN:
        raise ProtocolError("PeerPresent frame shorter than a key")
    key = bytes(payload[:KEY_LEN])
    if len(payload) < KEY_LEN + 18:
        return PeerPresent(key)
    ip = bytes(payload[KEY_LEN : KEY_LEN + 16])
    (port,) = struct.unpack(">H", payload[KEY_LEN + 16 : KEY_LEN + 18])
    flags = payload[KEY_LEN + 18] if len(payload) > KEY_LEN + 18 else 0
    return PeerPresent(key, ip, port, flags)


def parse_close_peer(payload: Payload) -> bytes:
    if len(payload) != KEY_LEN:
        raise ProtocolError("ClosePeer frame must carry exactly one key")
    return bytes(payload)


def parse_ping(payload: Payload) -> bytes:
    """Return the 8 bytes to echo; derper allows 8..1000 byte pings and echoes the first 8."""
    if len(payload) < PING_LEN:
        raise ProtocolError(f"Ping frame too short ({len(payload)} bytes)")
    if len(payload) > MAX_PING_LEN:
        raise ProtocolError(f"Ping frame too long ({len(payload)} bytes)")
    return bytes(payload[:PING_LEN])


def parse_pong(payload: Payload) -> bytes:
    if len(payload) < PING_LEN:
        raise ProtocolError("Pong frame too short")
    return bytes(payload[:PING_LEN])


def parse_restarting(payload: Payload) -> tuple[int, int]:
    """Return (reconnect_in_ms, try_for_ms)."""
    if len(payload) < 8:
        raise ProtocolError("Restarting frame too short")
    return _U32X2.unpack_from(payload)


def parse_health(payload: Payload) -> str:
    return bytes(payload).decode("utf-8", "replace")


def looks_like_disco(packet: Payload) -> bool:
    return len(packet) >= DISCO_MIN_LEN and packet[: len(DISCO_MAGIC)] == DISCO_MAGIC


# -- incremental parser ---------------------------------------------------------------------------


class FrameParser:
    """Splits a byte stream into (type, payload) frames, fed in chunks of any size.

    `max_frame_len` bounds the payload length a header may announce: a larger one is a protocol
    error raised as soon as the header arrives, before any payload is buffered, so a hostile length
    prefix costs nothing. The limit can be tightened after the handshake.

    With `oversize_fatal` set (a server after the handshake), only frames of those types are limited;
    a longer frame of any other type is discarded as it streams in, never buffered (derper's
    handleUnknownFrame reads and discards frames of any size).
    """

    __slots__ = ("_buf", "_fatal", "_limit", "_need", "_skip")

    def __init__(self, max_frame_len: int = MAX_INFO_LEN) -> None:
        self._buf = bytearray()
        self._skip = 0
        #: how long the buffered remainder must grow before a frame can be complete: until then a
        #: read is only appended (a byte-at-a-time sender costs O(its bytes), not O(buffered) per read)
        self._need = 0
        self._limit = max_frame_len
        self._fatal: frozenset[int] | None = None

    @property
    def max_frame_len(self) -> int:
        return self._limit

    @max_frame_len.setter
    def max_frame_len(self, limit: int) -> None:
        self._limit = limit
        self._need = 0  # the buffered header is checked again against the new limit

    @property
    def oversize_fatal(self) -> frozenset[int] | None:
        return self._fatal

    @oversize_fatal.setter
    def oversize_fatal(self, types: frozenset[int] | None) -> None:
        self._fatal = types
        self._need = 0

    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: Payload, route: Callable[[Payload, int], int] | None = None) -> list[tuple[int, memoryview]]:
        """Append `data` and return every frame now complete, in order.

        Payloads are zero-copy views into immutable bytes: valid as long as the caller holds them,
        never changed underneath. A frame cut by read boundaries is copied once more when its last
        byte arrives; the reads before that are only appended.

        `route(data, pos)`, if given, may take a run of complete frames from `pos` itself (the
        compiled relay loop, fastpath.py) and returns where it stopped; those frames are not returned.
        """
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return []
            data = data[self._skip :]
            self._skip = 0
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
            buf.clear()
        view = memoryview(data)
        frames: list[tuple[int, memoryview]] = []
        pos = 0
        end = len(data)
        limit = self._limit
        unpack = _HEADER.unpack_from
        while end - pos >= HEADER_LEN:
            if route is not None:
                pos = route(data, pos)
                if end - pos < HEADER_LEN:
                    break
            frame_type, length = unpack(data, pos)
            if length > limit:
                fatal = self._fatal
                if fatal is not None and frame_type not in fatal:
                    stop = pos + HEADER_LEN + length
                    if stop <= end:
                        pos = stop
                        continue
                    self._skip = stop - end
                    return frames
                raise ProtocolError(
                    f"{FRAME_NAMES.get(frame_type, hex(frame_type))} frame length {length} exceeds {limit}"
                )
            stop = pos + HEADER_LEN + length
            if stop > end:
                break
            frames.append((frame_type, view[pos + HEADER_LEN : stop]))
            pos = stop
        if pos < end:
            buf += view[pos:]
            # a remainder of a header or more already passed the length check above
            self._need = HEADER_LEN if end - pos < HEADER_LEN else HEADER_LEN + unpack(data, pos)[1]
        return frames
