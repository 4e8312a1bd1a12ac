"""The ClientHello reader (cluster/client_hello.py): real ClientHellos from OpenSSL, split and
re-fragmented every way, and garbage, which must end in ClientHelloError and nothing else."""

from __future__ import annotations

import contextlib
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.client_hello import MAX_HELLO, MAX_RECORD, MAX_WIRE, ClientHello, ClientHelloError, ClientHelloReader
from cluster.tls_alpn import offers_only_acme_tls


def openssl_hello(server_name: str | None, alpn: list[str] | None) -> bytes:
    """The first flight of Python's own TLS client: one handshake record holding the ClientHello."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records(message: bytes, size: int) -> bytes:
    """The handshake message re-fragmented into records of `size` bytes (RFC 8446 5.1 allows it)."""
    out = b""
    for at in range(0, len(message), size):
        chunk = message[at:at + size]
        out += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    return out


def handshake_message(wire: bytes) -> bytes:
    assert wire[0] == 22
    return wire[5:5 + int.from_bytes(wire[3:5], "big")]


def read(wire: bytes, step: int | None = None) -> ClientHello | None:
    reader = ClientHelloReader()
    if step is None:
        return reader.feed(wire)
    result = None
    for at in range(0, len(wire), step):
        result = reader.feed(wire[at:at + step])
        if result is not None:
            break
    return result


def test_reads_the_server_name_and_alpn_of_a_real_client_hello() -> None:
    hello = read(openssl_hello("derp.example.com", ["h2", "http/1.1"]))
    assert hello == ClientHello("derp.example.com", (b"h2", b"http/1.1"))
    assert not offers_only_acme_tls(hello)


def test_without_sni_or_alpn() -> None:
    assert read(openssl_hello(None, None)) == ClientHello(None, ())


def test_acme_tls_alone_is_what_the_ca_sends() -> None:
    hello = read(openssl_hello("derp.example.com", ["acme-tls/1"]))
    assert hello is not None and offers_only_acme_tls(hello)
    both = read(openssl_hello("derp.example.com", ["acme-tls/1", "http/1.1"]))
    assert both is not None and not offers_only_acme_tls(both)  # autocert: exactly [acme-tls/1]


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 64, 1000])
def test_reads_split_anywhere(step: int) -> None:
    assert read(openssl_hello("a.example", ["acme-tls/1"]), step) == ClientHello("a.example", (b"acme-tls/1",))


@pytest.mark.parametrize("size", [1, 4, 5, 100])
def test_a_client_hello_spanning_several_records(size: int) -> None:
    wire = records(handshake_message(openssl_hello("multi.example", ["http/1.1"])), size)
    assert read(wire) == ClientHello("multi.example", (b"http/1.1",))
    assert read(wire, 3) == ClientHello("multi.example", (b"http/1.1",))


def test_incomplete_is_none_and_later_bytes_are_not_read() -> None:
    wire = openssl_hello("x.example", None)
    reader = ClientHelloReader()
    assert reader.feed(wire[:-1]) is None
    assert reader.feed(wire[-1:] + b"\x17\x03\x03\x00\x05early") == ClientHello("x.example", ())


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the TLS port
    b"\x16\x02\x00\x00\x05hello",  # not TLS's record version
    b"\x16\x03\x01\x00\x00",  # an empty handshake record
    b"\x16\x03\x01\x40\x01",  # a record over 2^14 bytes
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
    b"\x16\x03\x01\x00\x04\x01\x00\x00\x00",  # a ClientHello with an empty body
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
])
def test_garbage_is_refused(garbage: bytes) -> None:
    with pytest.raises(ClientHelloError):
        ClientHelloReader().feed(garbage)


def test_a_declared_length_over_the_bound_is_refused_at_once() -> None:
    header = b"\x01" + (MAX_HELLO + 1).to_bytes(3, "big")
    with pytest.raises(ClientHelloError, match="over"):
        ClientHelloReader().feed(records(header, 4))


def test_records_that_never_finish_a_hello_are_bounded() -> None:
    reader = ClientHelloReader()
    body_start = b"\x01" + MAX_HELLO.to_bytes(3, "big")
    reader.feed(records(body_start, 4))
    with pytest.raises(ClientHelloError):
        for _ in range(MAX_WIRE // 6 + 2):
            reader.feed(b"\x16\x03\x01\x00\x01\x00")  # one-byte records: 6 wire bytes per message byte


def synthetic(extensions: bytes) -> bytes:
    """A minimal ClientHello record: version, random, no session, one suite, null compression."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    return records(b"\x01" + len(body).to_bytes(3, "big") + body, MAX_RECORD)


def extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


ALPN_ACME = extension(16, b"\x00\x0b\x0aacme-tls/1")


def test_a_hand_made_hello_and_its_malformed_variants() -> None:
    sni = extension(0, b"\x00\x06\x00\x00\x03a.b")
    assert ClientHelloReader().feed(synthetic(sni + ALPN_ACME)) == ClientHello("a.b", (b"acme-tls/1",))
    for bad in (ALPN_ACME + ALPN_ACME,  # an extension twice (RFC 8446 4.2)
                extension(16, b"\x00\x01\x00"),  # an empty protocol name (RFC 7301 3.1)
                extension(16, b"\x00\x0b\x0aacme-tls/1\x00"),  # bytes after the list
                extension(0, b"\x00\x03\x00\x00\x00"),  # an empty host name
                extension(0, b"\x00\x06\x00\x00\x09a.b"),  # a name longer than its list
                b"\x00"):  # a truncated extension header
        with pytest.raises(ClientHelloError):
            ClientHelloReader().feed(synthetic(bad))


def test_non_ascii_sni_is_refused() -> None:
    message = bytearray(handshake_message(openssl_hello("dup.example", None)))
    at = message.find(b"dup.example")
    message[at] = 0xFF  # not ASCII
    with pytest.raises(ClientHelloError, match="ASCII"):
        ClientHelloReader().feed(records(bytes(message), MAX_RECORD))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    with contextlib.suppress(ClientHelloError):
        ClientHelloReader().feed(data)


_REAL = openssl_hello("fuzz.example", ["acme-tls/1", "http/1.1"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_REAL) - 1), st.integers(0, 255)), max_size=8),
       st.integers(1, 300), st.integers(0, 40))
def test_mutated_hellos_never_raise_anything_else(flips: list[tuple[int, int]], step: int, cut: int) -> None:
    wire = bytearray(_REAL)
    for at, value in flips:
        wire[at] = value
    reader = ClientHelloReader()
    data = bytes(wire[:len(wire) - cut])
    try:
        for at in range(0, len(data), step):
            hello = reader.feed(data[at:at + step])
            if hello is not None:
                assert isinstance(hello.alpn, tuple)
                break
    except ClientHelloError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=MAX_RECORD).map(lambda tail: b"\x16\x03\x01" + b"\x40\x00" + tail))
def test_a_flood_of_records_stops_within_the_bound(prefix: bytes) -> None:
    reader = ClientHelloReader()
    fed = 0
    try:
        while fed <= MAX_WIRE:
            if reader.feed(prefix) is not None:
                return  # a random body that happens to parse: an answer all the same
            fed += len(prefix)
    except ClientHelloError:
        return
    raise AssertionError("fed more than MAX_WIRE without an answer")
