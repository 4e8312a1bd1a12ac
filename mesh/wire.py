"""Messages between workers and nodes over ZeroMQ: pure builders and parsers over bytes.

Packets travel in batches: one ZeroMQ message carries every packet queued for that peer during one
event-loop iteration, as repeated (dst 32 | src 32 | length u32 | payload). Control messages
(directory deltas, heartbeats, repair) are a type byte followed by msgpack.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack

PACKETS = 0x01
DIR_DELTA = 0x02
HEARTBEAT = 0x03
REPAIR = 0x04
NODE_GOSSIP = 0x05
#: "I merged your DIR_DELTA carrying ack=N": lets a worker hold ServerInfo until its node can route
DIR_ACK = 0x06
#: the keys the node's derper-connection holder learned from stock derpers (mesh.derper_keys)
DERPER_KEYS = 0x07
#: "send me your whole derper key list" (a DERPER_KEYS delta went missing)
DERPER_SYNC = 0x08

KEY_LEN = 32
MAX_PACKET = 64 << 10
_PKT_HEAD = struct.Struct(">32s32sI")
PKT_HEAD_LEN = _PKT_HEAD.size


class WireError(ValueError):
    """A mesh message is malformed; it is dropped and counted, never delivered."""


def packet_head(dst: bytes, src: bytes, length: int) -> bytes:
    """The 68-byte head of one packet record; the payload follows it in the batch."""
    return _PKT_HEAD.pack(dst, src, length)


def packet_record(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return _PKT_HEAD.pack(dst, src, len(payload)) + payload


def build_packets(parts: list[bytes | memoryview]) -> bytes:
    """One PACKETS message from records, or from heads and payloads given as separate parts."""
    return b"\x01" + b"".join(parts)


def iter_packets(message: bytes | memoryview) -> Iterator[tuple[bytes, bytes, memoryview]]:
    """Yield (dst, src, payload) from a PACKETS message; raise WireError on a malformed batch.

    Payloads are zero-copy views into the message, valid while the caller holds the message."""
    view = memoryview(message)
    pos = 1
    end = len(message)
    unpack = _PKT_HEAD.unpack_from
    while pos < end:
        if end - pos < PKT_HEAD_LEN:
            raise WireError("truncated packet record header")
        dst, src, length = unpack(view, pos)
        pos += PKT_HEAD_LEN
        if length > MAX_PACKET or pos + length > end:
            raise WireError(f"packet record of {length} bytes overruns the batch")
        yield dst, src, view[pos : pos + length]
        pos += length


def build_control(kind: int, body: dict[str, Any]) -> bytes:
    return bytes((kind,)) + msgpack.packb(body, use_bin_type=True)


def parse_control(message: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(message[1:], raw=False, strict_map_key=False, max_bin_len=64 << 20)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise WireError(f"control message is not msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise WireError("control message is not a map")
    return body


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise WireError(f"control message field {name!r} missing or not {kind}")
    return value
