"""STUN Binding codec (RFC 5389 / RFC 8489): pure functions over bytes, no I/O.

Every function that looks at bytes from the network returns a result or a `DropReason`; none of them
raises on any input, so a server can count what it dropped instead of guarding each call.

Choices (see docs/STUN.md):
- RFC 3489 "classic" requests (no magic cookie) are NOT answered. Without the cookie nothing tells a
  classic request from any 20-byte datagram that starts with 00 01, and classic clients may ask for
  RESPONSE-ADDRESS / CHANGE-REQUEST behaviour we cannot honour. They are dropped as `bad_cookie`.
- Comprehension-required attributes (type < 0x8000) in a request are not understood by a plain
  Binding server. RFC 8489 forbids a success response then (it wants a 420 error); we send no error
  responses at all, so the request is dropped as `unknown_required_attribute`.
- A FINGERPRINT in a request is checked (and must be last); a wrong one is `bad_fingerprint`.
- The response carries XOR-MAPPED-ADDRESS and MAPPED-ADDRESS. SOFTWARE is added only when the request
  itself was big enough to pay for it, and FINGERPRINT never, so a response is never larger than the
  request plus the two address attributes (`max_response_size`).
"""

from __future__ import annotations

import os
import socket
import struct
import zlib
from enum import StrEnum
from typing import NamedTuple

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
TRANSACTION_ID_LEN = 12

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
# Some servers put XOR-MAPPED-ADDRESS in the comprehension-optional range; clients accept it.
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

_FINGERPRINT_XOR = 0x5354554E
_FINGERPRINT_ATTR_LEN = 8
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
# Address attribute sizes on the wire: 4-byte TLV header + 4 bytes (reserved, family, port) + address.
_ADDR_ATTR_LEN = {FAMILY_IPV4: 4 + 4 + 4, FAMILY_IPV6: 4 + 4 + 16}

_HEADER = struct.Struct("!HHI12s")
_TLV = struct.Struct("!HH")


class DropReason(StrEnum):
    """Why a datagram got no answer (server side) or was not accepted as a response (client side)."""

    TOO_SHORT = "too_short"  # fewer than 20 bytes: cannot even hold a header
    NOT_STUN = "not_stun"  # the two top bits of the type are set: some other protocol
    BAD_COOKIE = "bad_cookie"  # no RFC 5389 magic cookie (this includes RFC 3489 classic requests)
    TRUNCATED = "truncated"  # the length field promises more bytes than arrived
    BAD_LENGTH = "bad_length"  # trailing bytes after the message, or length not a multiple of 4
    NOT_BINDING_REQUEST = "not_binding_request"  # well-formed STUN, but not a Binding request
    MALFORMED_ATTRIBUTES = "malformed_attributes"  # a TLV overruns the message, or FINGERPRINT not last
    UNKNOWN_REQUIRED_ATTRIBUTE = "unknown_required_attribute"  # see module docstring
    BAD_FINGERPRINT = "bad_fingerprint"
    # Client side only.
    NOT_BINDING_RESPONSE = "not_binding_response"
    ERROR_RESPONSE = "error_response"
    NO_MAPPED_ADDRESS = "no_mapped_address"


# NamedTuples rather than frozen dataclasses: they are built once per datagram on the hot path and
# construct several times faster.
class StunHeader(NamedTuple):
    msg_type: int
    length: int
    cookie: int
    transaction_id: bytes


class BindingRequest(NamedTuple):
    """A request we will answer. `size` is its length on the wire, the budget for the response."""

    transaction_id: bytes
    size: int


class BindingResponse(NamedTuple):
    transaction_id: bytes
    ip: str
    port: int
    software: str | None


def parse_header(data: bytes) -> StunHeader | DropReason:
    """Check the fixed 20-byte header and that the length field matches the datagram exactly."""
    if len(data) < HEADER_LEN:
        return DropReason.TOO_SHORT
    msg_type, length, cookie, txid = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        return DropReason.NOT_STUN
    if cookie != MAGIC_COOKIE:
        return DropReason.BAD_COOKIE
    body = len(data) - HEADER_LEN
    if length > body:
        return DropReason.TRUNCATED
    if length != body or length & 3:
        return DropReason.BAD_LENGTH
    return StunHeader(msg_type, length, cookie, txid)


def parse_attributes(data: bytes) -> list[tuple[int, bytes]] | DropReason:
    """Split the attributes of a message whose header `parse_header` accepted.

    Each TLV value is padded to 4 bytes; the padded value must fit inside the message. FINGERPRINT,
    if present, must be the last attribute, 4 bytes long, and match the CRC of what precedes it.
    """
    attrs: list[tuple[int, bytes]] = []
    end = len(data)
    pos = HEADER_LEN
    while pos < end:
        if end - pos < 4:
            return DropReason.MALFORMED_ATTRIBUTES
        attr_type, attr_len = _TLV.unpack_from(data, pos)
        value_start = pos + 4
        next_pos = value_start + ((attr_len + 3) & ~3)
        if next_pos > end:
            return DropReason.MALFORMED_ATTRIBUTES
        value = bytes(data[value_start : value_start + attr_len])
        if attr_type == ATTR_FINGERPRINT:
            if attr_len != 4 or next_pos != end:
                return DropReason.MALFORMED_ATTRIBUTES
            if int.from_bytes(value, "big") != fingerprint(data[:pos]):
                return DropReason.BAD_FINGERPRINT
        attrs.append((attr_type, value))
        pos = next_pos
    return attrs


def fingerprint(prefix: bytes) -> int:
    """FINGERPRINT value over the message bytes before the attribute (length field already final)."""
    return (zlib.crc32(prefix) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF


def classify_request(data: bytes) -> BindingRequest | DropReason:
    """Decide whether a datagram is a Binding request we answer. Never raises."""
    # No try/except here on purpose: every read is bounds-checked, and the hypothesis tests would
    # not see a bug that a blanket handler swallowed. The server guards its handler separately.
    header = parse_header(data)
    if isinstance(header, DropReason):
        return header
    if header.msg_type != BINDING_REQUEST:
        return DropReason.NOT_BINDING_REQUEST
    attrs = parse_attributes(data)
    if isinstance(attrs, DropReason):
        return attrs
    for attr_type, _ in attrs:
        if attr_type < 0x8000:
            return DropReason.UNKNOWN_REQUIRED_ATTRIBUTE
    return BindingRequest(header.transaction_id, len(data))


def _pack_ip(ip: str) -> tuple[int, bytes]:
    """(family, packed address). IPv4-mapped IPv6 (a dual-stack socket's view of a v4 client) is
    reported as IPv4, which is what the client actually is. Raises ValueError on a bad address."""
    host = ip.split("%", 1)[0]  # drop a link-local scope id such as fe80::1%eth0
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host)
            if packed[:12] == _V4_MAPPED_PREFIX:
                return FAMILY_IPV4, packed[12:]
            return FAMILY_IPV6, packed
        return FAMILY_IPV4, socket.inet_pton(socket.AF_INET, host)
    except OSError as exc:
        raise ValueError(f"not an IP address: {ip!r}") from exc


def _xor(packed: bytes, txid: bytes) -> bytes:
    """XOR an address with cookie + transaction id (RFC 8489 14.2); one big-int XOR is the fast way."""
    key = (_COOKIE_BYTES + txid)[: len(packed)]
    return (int.from_bytes(packed, "big") ^ int.from_bytes(key, "big")).to_bytes(len(packed), "big")


def _unpack_ip(family: int, packed: bytes) -> str:
    if family == FAMILY_IPV4:
        return socket.inet_ntop(socket.AF_INET, packed)
    return socket.inet_ntop(socket.AF_INET6, packed)


def address_attributes_size(ip: str) -> int:
    """Bytes of XOR-MAPPED-ADDRESS + MAPPED-ADDRESS in a response to a client at `ip`."""
    return 2 * _ADDR_ATTR_LEN[_pack_ip(ip)[0]]


def max_response_size(request_size: int, ip: str) -> int:
    """The amplification bound: a response never exceeds the request plus the address attributes."""
    return request_size + address_attributes_size(ip)


def _software_attr(software: str) -> bytes:
    raw = software.encode("utf-8")[:763]  # RFC 8489: SOFTWARE value is at most 763 bytes
    return _TLV.pack(ATTR_SOFTWARE, len(raw)) + raw + b"\x00" * (-len(raw) & 3)


def build_binding_response(request: BindingRequest, ip: str, port: int, *, software: str | None = None) -> bytes:
    """Binding success response for a client seen at (ip, port).

    SOFTWARE goes in only if header + SOFTWARE fits in the request's size, so the response stays
    within `max_response_size`. Raises ValueError for a bad ip or port (these come from the socket,
    not from the peer's bytes).
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    family, packed = _pack_ip(ip)
    txid = request.transaction_id
    xaddr = _xor(packed, txid)
    value_len = 4 + len(packed)
    xor_mapped = (
        _TLV.pack(ATTR_XOR_MAPPED_ADDRESS, value_len)
        + struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16))
        + xaddr
    )
    mapped = _TLV.pack(ATTR_MAPPED_ADDRESS, value_len) + struct.pack("!BBH", 0, family, port) + packed
    body = xor_mapped + mapped
    if software:
        extra = _software_attr(software)
        # The request "paid" for HEADER_LEN + its attributes; spend that on SOFTWARE only if it fits.
        if HEADER_LEN + len(extra) <= request.size:
            body += extra
    return _HEADER.pack(BINDING_SUCCESS, len(body), MAGIC_COOKIE, txid) + body


def respond(data: bytes, ip: str, port: int, *, software: str | None = None) -> bytes | DropReason:
    """Classify a datagram and, if it is a Binding request, build the answer. The server's one call."""
    request = classify_request(data)
    if isinstance(request, DropReason):
        return request
    return build_binding_response(request, ip, port, software=software)


def new_transaction_id() -> bytes:
    return os.urandom(TRANSACTION_ID_LEN)


def build_binding_request(
    transaction_id: bytes | None = None, *, software: str | None = None, add_fingerprint: bool = False
) -> bytes:
    """A Binding request; with a random transaction id unless one is given (12 bytes)."""
    txid = transaction_id if transaction_id is not None else new_transaction_id()
    if len(txid) != TRANSACTION_ID_LEN:
        raise ValueError("transaction id must be 12 bytes")
    body = _software_attr(software) if software else b""
    if not add_fingerprint:
        return _HEADER.pack(BINDING_REQUEST, len(body), MAGIC_COOKIE, txid) + body
    # The length field must already count the FINGERPRINT attribute when the CRC is computed.
    head = _HEADER.pack(BINDING_REQUEST, len(body) + _FINGERPRINT_ATTR_LEN, MAGIC_COOKIE, txid) + body
    return head + _TLV.pack(ATTR_FINGERPRINT, 4) + fingerprint(head).to_bytes(4, "big")


def _decode_address(value: bytes, txid: bytes, *, xor: bool) -> tuple[str, int] | None:
    if len(value) < 4:
        return None
    family = value[1]
    size = 4 if family == FAMILY_IPV4 else 16 if family == FAMILY_IPV6 else 0
    if size == 0 or len(value) < 4 + size:
        return None
    port = int.from_bytes(value[2:4], "big")
    packed = value[4 : 4 + size]
    if xor:
        port ^= MAGIC_COOKIE >> 16
        packed = _xor(packed, txid)
    return _unpack_ip(family, packed), port


def parse_binding_response(data: bytes) -> BindingResponse | DropReason:
    """Parse a Binding success response: XOR-MAPPED-ADDRESS wins, MAPPED-ADDRESS is the fallback.

    Checking the transaction id against the request is the caller's job (the id is returned).
    Never raises.
    """
    header = parse_header(data)
    if isinstance(header, DropReason):
        return header
    if header.msg_type == BINDING_ERROR:
        return DropReason.ERROR_RESPONSE
    if header.msg_type != BINDING_SUCCESS:
        return DropReason.NOT_BINDING_RESPONSE
    attrs = parse_attributes(data)
    if isinstance(attrs, DropReason):
        return attrs
    txid = header.transaction_id
    xor_addr: tuple[str, int] | None = None
    plain_addr: tuple[str, int] | None = None
    software: str | None = None
    for attr_type, value in attrs:
        if attr_type in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT) and xor_addr is None:
            xor_addr = _decode_address(value, txid, xor=True)
        elif attr_type == ATTR_MAPPED_ADDRESS and plain_addr is None:
            plain_addr = _decode_address(value, txid, xor=False)
        elif attr_type == ATTR_SOFTWARE:
            software = value.decode("utf-8", "replace")
    addr = xor_addr or plain_addr
    if addr is None:
        return DropReason.NO_MAPPED_ADDRESS
    return BindingResponse(txid, addr[0], addr[1], software)
