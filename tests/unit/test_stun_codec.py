"""Unit and property tests for stun.codec (pure bytes in, bytes or DropReason out)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stun.codec import (
    ATTR_FINGERPRINT,
    ATTR_MAPPED_ADDRESS,
    ATTR_SOFTWARE,
    ATTR_XOR_MAPPED_ADDRESS,
    ATTR_XOR_MAPPED_ADDRESS_ALT,
    MAGIC_COOKIE,
    BindingRequest,
    BindingResponse,
    DropReason,
    address_attributes_size,
    build_binding_request,
    build_binding_response,
    classify_request,
    fingerprint,
    max_response_size,
    parse_attributes,
    parse_binding_response,
    parse_header,
    respond,
)

TXID = bytes(range(1, 13))


def tlv(attr_type: int, value: bytes) -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + value + b"\x00" * (-len(value) & 3)


def message(msg_type: int, attrs: bytes = b"", *, cookie: int = MAGIC_COOKIE, txid: bytes = TXID) -> bytes:
    return struct.pack("!HHI12s", msg_type, len(attrs), cookie, txid) + attrs


def with_fingerprint(msg_type: int, attrs: bytes = b"", txid: bytes = TXID) -> bytes:
    """A message ending in a correct FINGERPRINT (length field counts it before the CRC is taken)."""
    head = struct.pack("!HHI12s", msg_type, len(attrs) + 8, MAGIC_COOKIE, txid) + attrs
    return head + struct.pack("!HHI", ATTR_FINGERPRINT, 4, fingerprint(head))


# --- requests ------------------------------------------------------------------------------------


def test_plain_request_round_trip() -> None:
    data = build_binding_request(TXID)
    assert len(data) == 20
    assert classify_request(data) == BindingRequest(TXID, 20)


def test_request_with_software_and_fingerprint_round_trip() -> None:
    data = build_binding_request(TXID, software="tailnode", add_fingerprint=True)
    # Same layout as Tailscale's client request: SOFTWARE "tailnode" (12) + FINGERPRINT (8).
    assert len(data) == 40
    assert classify_request(data) == BindingRequest(TXID, 40)
    attrs = parse_attributes(data)
    assert not isinstance(attrs, DropReason)
    assert [t for t, _ in attrs] == [ATTR_SOFTWARE, ATTR_FINGERPRINT]


def test_random_transaction_ids_differ() -> None:
    assert build_binding_request()[8:20] != build_binding_request()[8:20]


def test_request_builder_rejects_bad_transaction_id() -> None:
    with pytest.raises(ValueError):
        build_binding_request(b"short")


def test_comprehension_optional_attributes_are_accepted() -> None:
    attrs = tlv(0x8029, b"\x00" * 8) + tlv(0xC001, b"abc")  # ICE-CONTROLLED, some unknown optional one
    assert isinstance(classify_request(message(0x0001, attrs)), BindingRequest)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", DropReason.TOO_SHORT),
        (build_binding_request(TXID)[:19], DropReason.TOO_SHORT),
        (b"\xff" * 40, DropReason.NOT_STUN),
        (b"\x80" + build_binding_request(TXID)[1:], DropReason.NOT_STUN),
        (message(0x0001, cookie=0x12345678), DropReason.BAD_COOKIE),
        # RFC 3489 classic request: 16-byte transaction id and no cookie. Deliberately not answered.
        (struct.pack("!HH16s", 0x0001, 0, b"\x01" * 16), DropReason.BAD_COOKIE),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", DropReason.NOT_STUN),
        (build_binding_request(TXID, software="tailnode", add_fingerprint=True)[:28], DropReason.TRUNCATED),
        (build_binding_request(TXID) + b"\x00" * 4, DropReason.BAD_LENGTH),
        (struct.pack("!HHI12s", 1, 2, MAGIC_COOKIE, TXID) + b"ab", DropReason.BAD_LENGTH),
        (message(0x0101), DropReason.NOT_BINDING_REQUEST),  # a Binding success response
        (message(0x0111), DropReason.NOT_BINDING_REQUEST),  # a Binding error response
        (message(0x0011), DropReason.NOT_BINDING_REQUEST),  # a Binding indication
        (message(0x0003), DropReason.NOT_BINDING_REQUEST),  # TURN Allocate
        # Attribute header says 16 bytes of value, only 4 follow.
        (message(0x0001, struct.pack("!HH", ATTR_SOFTWARE, 16) + b"abcd"), DropReason.MALFORMED_ATTRIBUTES),
        # Attribute value of 5 bytes: its padding (to 8) runs past the message end.
        (message(0x0001, struct.pack("!HH", ATTR_SOFTWARE, 5) + b"abcd"), DropReason.MALFORMED_ATTRIBUTES),
        # An attribute header promising 2 bytes of value (padded to 4) with nothing after it.
        (message(0x0001, tlv(ATTR_SOFTWARE, b"ab")[:4]), DropReason.MALFORMED_ATTRIBUTES),
        (
            message(0x0001, tlv(ATTR_FINGERPRINT, b"\x00" * 4) + tlv(ATTR_SOFTWARE, b"x")),
            DropReason.MALFORMED_ATTRIBUTES,
        ),
        (message(0x0001, tlv(ATTR_FINGERPRINT, b"\x00" * 8)), DropReason.MALFORMED_ATTRIBUTES),
        (message(0x0001, tlv(ATTR_FINGERPRINT, b"\x00" * 4)), DropReason.BAD_FINGERPRINT),
        (message(0x0001, tlv(0x0003, b"\x00\x00\x00\x06")), DropReason.UNKNOWN_REQUIRED_ATTRIBUTE),  # CHANGE-REQUEST
        (message(0x0001, tlv(0x0002, b"\x00" * 8)), DropReason.UNKNOWN_REQUIRED_ATTRIBUTE),  # RESPONSE-ADDRESS
        (with_fingerprint(0x0001, tlv(0x0006, b"user")), DropReason.UNKNOWN_REQUIRED_ATTRIBUTE),  # USERNAME
    ],
)
def test_drop_reasons(data: bytes, reason: DropReason) -> None:
    assert classify_request(data) is reason
    assert respond(data, "192.0.2.1", 1234) is reason


def test_fingerprint_is_checked() -> None:
    good = build_binding_request(TXID, software="tailnode", add_fingerprint=True)
    assert isinstance(classify_request(good), BindingRequest)
    bad = bytearray(good)
    bad[25] ^= 0x01  # inside SOFTWARE
    assert classify_request(bytes(bad)) is DropReason.BAD_FINGERPRINT


def test_fingerprint_matches_independent_implementation() -> None:
    aioice_stun = pytest.importorskip("aioice.stun", reason="aioice not installed (pip install aioice)")
    msg = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.REQUEST,
        transaction_id=TXID,
    )
    msg.attributes["SOFTWARE"] = "independent"
    msg.add_fingerprint()
    assert classify_request(bytes(msg)) == BindingRequest(TXID, len(bytes(msg)))
    # And the other way round: aioice's parser verifies our FINGERPRINT (it raises if wrong).
    ours = aioice_stun.parse_message(build_binding_request(TXID, software="x", add_fingerprint=True))
    assert ours.attributes["SOFTWARE"] == "x"
    assert ours.transaction_id == TXID


def test_parse_header_fields() -> None:
    header = parse_header(build_binding_request(TXID))
    assert not isinstance(header, DropReason)
    assert (header.msg_type, header.length, header.cookie, header.transaction_id) == (1, 0, MAGIC_COOKIE, TXID)


# --- responses -----------------------------------------------------------------------------------

# RFC 5769 sections 2.2 / 2.3: transaction id and the XOR-MAPPED-ADDRESS values for 192.0.2.1:32853 and
# 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
RFC5769_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_XOR_V4 = bytes.fromhex("002000080001a147e112a643")
RFC5769_XOR_V6 = bytes.fromhex("002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


@pytest.mark.parametrize(
    ("ip", "xor_attr"),
    [("192.0.2.1", RFC5769_XOR_V4), ("2001:db8:1234:5678:11:2233:4455:6677", RFC5769_XOR_V6)],
)
def test_response_matches_rfc5769_vectors(ip: str, xor_attr: bytes) -> None:
    resp = build_binding_response(BindingRequest(RFC5769_TXID, 20), ip, 32853)
    assert resp[:2] == b"\x01\x01"
    assert resp[4:8] == MAGIC_COOKIE.to_bytes(4, "big")
    assert resp[8:20] == RFC5769_TXID
    assert resp[20 : 20 + len(xor_attr)] == xor_attr
    assert parse_binding_response(resp) == BindingResponse(RFC5769_TXID, ip, 32853, None)


@pytest.mark.parametrize(
    ("ip", "expected_ip", "family"),
    [
        ("127.0.0.1", "127.0.0.1", 1),
        ("::1", "::1", 2),
        ("fe80::1%eth0", "fe80::1", 2),
        # A dual-stack ("::") socket sees IPv4 clients as v4-mapped; they are IPv4 clients.
        ("::ffff:203.0.113.9", "203.0.113.9", 1),
    ],
)
def test_response_round_trip(ip: str, expected_ip: str, family: int) -> None:
    request = build_binding_request(TXID)
    resp = respond(request, ip, 54321)
    assert isinstance(resp, bytes)
    parsed = parse_binding_response(resp)
    assert parsed == BindingResponse(TXID, expected_ip, 54321, None)
    attrs = parse_attributes(resp)
    assert not isinstance(attrs, DropReason)
    types = [t for t, _ in attrs]
    assert types == [ATTR_XOR_MAPPED_ADDRESS, ATTR_MAPPED_ADDRESS]
    assert all(value[1] == family for _, value in attrs)
    assert len(resp) == max_response_size(len(request), ip)


def test_software_only_when_the_request_paid_for_it() -> None:
    small = build_binding_request(TXID)  # 20 bytes: no room
    resp = respond(small, "127.0.0.1", 1, software="derp-cluster")
    assert isinstance(resp, bytes)
    assert parse_binding_response(resp).software is None  # type: ignore[union-attr]
    big = build_binding_request(TXID, software="tailnode", add_fingerprint=True)  # 40 bytes: 20 to spend
    resp = respond(big, "127.0.0.1", 1, software="derp-cluster")
    assert isinstance(resp, bytes)
    assert parse_binding_response(resp).software == "derp-cluster"  # type: ignore[union-attr]
    assert len(resp) <= max_response_size(len(big), "127.0.0.1")


def test_response_builder_rejects_bad_socket_address() -> None:
    with pytest.raises(ValueError):
        build_binding_response(BindingRequest(TXID, 20), "not-an-ip", 1)
    with pytest.raises(ValueError):
        build_binding_response(BindingRequest(TXID, 20), "127.0.0.1", 70000)


def _mapped(ip: str, port: int) -> bytes:
    packed = ipaddress.ip_address(ip).packed
    return struct.pack("!BBH", 0, 1 if len(packed) == 4 else 2, port) + packed


def test_response_parser_falls_back_to_mapped_address() -> None:
    resp = message(0x0101, tlv(ATTR_MAPPED_ADDRESS, _mapped("198.51.100.7", 4242)))
    assert parse_binding_response(resp) == BindingResponse(TXID, "198.51.100.7", 4242, None)


def test_response_parser_prefers_xor_mapped_address() -> None:
    xor_first = build_binding_response(BindingRequest(TXID, 20), "198.51.100.7", 4242)
    # Put a contradicting MAPPED-ADDRESS first: the XOR one must still win.
    attrs = tlv(ATTR_MAPPED_ADDRESS, _mapped("10.9.9.9", 1)) + xor_first[20:32]
    assert parse_binding_response(message(0x0101, attrs)) == BindingResponse(TXID, "198.51.100.7", 4242, None)


def test_response_parser_accepts_alt_xor_type() -> None:
    resp = build_binding_response(BindingRequest(TXID, 20), "198.51.100.7", 4242)
    alt = struct.pack("!H", ATTR_XOR_MAPPED_ADDRESS_ALT) + resp[22:32]
    assert parse_binding_response(message(0x0101, alt)) == BindingResponse(TXID, "198.51.100.7", 4242, None)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (message(0x0101), DropReason.NO_MAPPED_ADDRESS),
        (message(0x0101, tlv(ATTR_MAPPED_ADDRESS, b"\x00\x07\x00\x01" + b"\x00" * 4)), DropReason.NO_MAPPED_ADDRESS),
        (message(0x0101, tlv(ATTR_XOR_MAPPED_ADDRESS, b"\x00\x01\x00")), DropReason.NO_MAPPED_ADDRESS),
        (message(0x0111, tlv(0x0009, b"\x00\x00\x04\x00")), DropReason.ERROR_RESPONSE),
        (build_binding_request(TXID), DropReason.NOT_BINDING_RESPONSE),
        (b"\x01\x01\x00", DropReason.TOO_SHORT),
        (message(0x0101, cookie=0), DropReason.BAD_COOKIE),
    ],
)
def test_response_parser_rejects(data: bytes, reason: DropReason) -> None:
    assert parse_binding_response(data) is reason


# --- properties ----------------------------------------------------------------------------------

ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200), ip=ips, port=st.integers(0, 65535), software=st.none() | st.text(max_size=40))
def test_any_bytes_never_raise_and_only_requests_get_bounded_answers(
    data: bytes, ip: str, port: int, software: str | None
) -> None:
    verdict = classify_request(data)
    assert isinstance(verdict, BindingRequest | DropReason)
    assert isinstance(parse_binding_response(data), BindingResponse | DropReason)
    out = respond(data, ip, port, software=software)
    if isinstance(verdict, DropReason):
        assert out is verdict
    else:
        assert isinstance(out, bytes)
        assert len(out) <= len(data) + address_attributes_size(ip)


attr_types = st.one_of(
    st.integers(0x8000, 0xFFFF).filter(lambda t: t != ATTR_FINGERPRINT),
    st.sampled_from([0x0001, 0x0003, 0x0006, 0x0008, 0x0020, ATTR_SOFTWARE]),
)
attributes = st.lists(st.tuples(attr_types, st.binary(max_size=24)), max_size=5)


@st.composite
def near_valid_messages(draw: st.DrawFn) -> bytes:
    """Messages built from a real header and TLVs, then possibly bent: random bytes almost never get past
    the cookie check, these exercise every later branch."""
    msg_type = draw(st.sampled_from([0x0001, 0x0001, 0x0101, 0x0111, 0x0011]) | st.integers(0, 0xFFFF))
    body = b"".join(tlv(t, v) for t, v in draw(attributes))
    txid = draw(st.binary(min_size=12, max_size=12))
    fingerprinted = draw(st.booleans())
    data = with_fingerprint(msg_type, body, txid) if fingerprinted else message(msg_type, body, txid=txid)
    bend = draw(st.sampled_from(["none", "truncate", "flip", "length"]))
    if bend == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif bend == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif bend == "length":
        data = data[:2] + struct.pack("!H", draw(st.integers(0, 0xFFFF))) + data[4:]
    return data


@settings(max_examples=1000, deadline=None)
@given(data=near_valid_messages(), ip=ips, port=st.integers(0, 65535))
def test_near_valid_messages_never_raise_and_stay_bounded(data: bytes, ip: str, port: int) -> None:
    verdict = classify_request(data)
    assert isinstance(parse_binding_response(data), BindingResponse | DropReason)
    out = respond(data, ip, port, software="derp-cluster")
    if isinstance(verdict, DropReason):
        assert out is verdict
        return
    assert isinstance(out, bytes)
    assert len(out) <= max_response_size(len(data), ip)
    parsed = parse_binding_response(out)
    assert isinstance(parsed, BindingResponse)
    assert parsed.transaction_id == data[8:20] == verdict.transaction_id
    assert parsed.port == port
    expected = ipaddress.ip_address(ip)
    if isinstance(expected, ipaddress.IPv6Address) and expected.ipv4_mapped is not None:
        expected = expected.ipv4_mapped  # a v4 client seen through a dual-stack socket is answered as v4
    assert ipaddress.ip_address(parsed.ip) == expected


@settings(deadline=None)
@given(txid=st.binary(min_size=12, max_size=12), attrs=attributes)
def test_well_formed_requests_are_classified_by_their_attributes(txid: bytes, attrs: list[tuple[int, bytes]]) -> None:
    body = b"".join(tlv(t, v) for t, v in attrs)
    verdict = classify_request(message(0x0001, body, txid=txid))
    if any(t < 0x8000 for t, _ in attrs):
        assert verdict is DropReason.UNKNOWN_REQUIRED_ATTRIBUTE
    else:
        assert verdict == BindingRequest(txid, 20 + len(body))


@settings(deadline=None)
@given(txid=st.binary(min_size=12, max_size=12), software=st.text(max_size=30), data=st.data())
def test_prefixes_and_single_byte_changes_of_a_fingerprinted_request_are_dropped(
    txid: bytes, software: str, data: st.DataObject
) -> None:
    good = build_binding_request(txid, software=software or None, add_fingerprint=True)
    assert isinstance(classify_request(good), BindingRequest)
    cut = data.draw(st.integers(0, len(good) - 1))
    assert isinstance(classify_request(good[:cut]), DropReason)
    # Any byte outside the attribute TLV headers. Changing a TLV header can re-frame the message into
    # one with no FINGERPRINT at all (e.g. SOFTWARE's length swallowing it), which is a valid request.
    tlv_headers = {20, 21, 22, 23} if software else set()
    tlv_headers |= set(range(len(good) - 8, len(good) - 4))
    i = data.draw(st.integers(0, len(good) - 1).filter(lambda k: k not in tlv_headers))
    changed = good[:i] + bytes([good[i] ^ data.draw(st.integers(1, 255))]) + good[i + 1 :]
    # CRC-32 catches every burst error of up to 32 bits, so no one-byte change can slip through.
    assert isinstance(classify_request(changed), DropReason)
