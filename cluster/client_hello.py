"""A sans-I/O reader for the TLS ClientHello: the server name (SNI) and the ALPN protocols offered.

Python's ssl module picks the certificate only by SNI (sni_callback) and has no callback on the
ALPN protocols offered, yet answering ACME's TLS-ALPN-01 (RFC 8737) means serving a different
certificate when a client offers exactly `acme-tls/1`. The DERP port sees the raw bytes before TLS
starts (the accept gate runs there, D14), so it reads the ClientHello itself with this reader, picks
the context, and then hands every byte it read to the TLS protocol.

Bounded: at most MAX_HELLO bytes of handshake message and MAX_WIRE bytes on the wire (records of
at most 2^14 bytes each, RFC 8446 5.1); a ClientHello may span several records and reads may split
anywhere. Anything that is not a well-formed ClientHello raises ClientHelloError, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Go's crypto/tls maxHandshake; a ClientHello with post-quantum key shares is about 2 KiB
MAX_HELLO = 65536
#: what the records of one MAX_HELLO message may take on the wire, headers included
MAX_WIRE = 2 * MAX_HELLO
MAX_RECORD = 16384

_RECORD_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_NAME_TYPE_HOST = 0


class ClientHelloError(ValueError):
    """The bytes are not a TLS ClientHello this reader accepts."""


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None  # the host_name of the SNI extension, None without one
    alpn: tuple[bytes, ...]  # the protocols offered, in the client's order; () without the extension


class ClientHelloReader:
    """Feed the connection's first bytes; `feed` returns the ClientHello once it is complete."""

    def __init__(self) -> None:
        self._wire = bytearray()  # record bytes not yet consumed (at most one partial record)
        self._wire_seen = 0
        self._message = bytearray()  # handshake message bytes gathered from the records
        self.result: ClientHello | None = None

    def feed(self, data: bytes) -> ClientHello | None:
        if self.result is not None:
            return self.result  # what follows the ClientHello is not ours to read
        self._wire_seen += len(data)
        if self._wire_seen > MAX_WIRE:
            raise ClientHelloError(f"no complete ClientHello in {MAX_WIRE} bytes")
        self._wire += data
        while len(self._wire) >= 5:
            kind, major, length = self._wire[0], self._wire[1], int.from_bytes(self._wire[3:5], "big")
            if kind != _RECORD_HANDSHAKE:
                raise ClientHelloError(f"record type {kind} is not a handshake")
            if major != 3:
                raise ClientHelloError(f"record version {major}.{self._wire[2]} is not TLS")
            if not 0 < length <= MAX_RECORD:
                raise ClientHelloError(f"handshake record of {length} bytes")
            if len(self._wire) < 5 + length:
                return None
            self._message += self._wire[5:5 + length]
            del self._wire[:5 + length]
            self.result = self._complete_message()
            if self.result is not None:
                return self.result
        return None

    def _complete_message(self) -> ClientHello | None:
        message = self._message
        if len(message) < 4:
            return None
        if message[0] != _HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError(f"handshake message type {message[0]} is not a ClientHello")
        length = int.from_bytes(message[1:4], "big")
        if length > MAX_HELLO:
            raise ClientHelloError(f"ClientHello of {length} bytes is over {MAX_HELLO}")
        if len(message) < 4 + length:
            return None
        if len(message) > 4 + length:
            # a second handshake message before the ServerHello: never in a first flight
            raise ClientHelloError("bytes after the ClientHello in its records")
        return parse_client_hello_body(bytes(message[4:]))


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int, what: str) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise ClientHelloError(f"ClientHello truncated in {what}")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def number(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> _Cursor:
        return _Cursor(self.take(self.number(length_size, what), what))

    def done(self) -> bool:
        return self.pos == len(self.data)


def parse_client_hello_body(body: bytes) -> ClientHello:
    """The ClientHello message body (after the 4-byte handshake header), RFC 8446 4.1.2."""
    cursor = _Cursor(body)
    cursor.take(2 + 32, "version and random")
    if len(cursor.vector(1, "session id").data) > 32:
        raise ClientHelloError("session id over 32 bytes")
    suites = cursor.vector(2, "cipher suites")
    if not suites.data or len(suites.data) % 2:
        raise ClientHelloError("cipher suites list malformed")
    if not cursor.vector(1, "compression methods").data:
        raise ClientHelloError("no compression methods")
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    if cursor.done():
        return ClientHello(None, ())  # TLS 1.2 allows a ClientHello without extensions
    extensions = cursor.vector(2, "extensions")
    if not cursor.done():
        raise ClientHelloError("bytes after the extensions")
    seen: set[int] = set()
    while not extensions.done():
        kind = extensions.number(2, "extension type")
        data = extensions.vector(2, "extension data")
        if kind in seen:
            raise ClientHelloError(f"extension {kind} twice")  # RFC 8446 4.2
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            server_name = _server_name(data)
        elif kind == _EXT_ALPN:
            alpn = _alpn(data)
    return ClientHello(server_name, alpn)


def _server_name(data: _Cursor) -> str | None:
    names = data.vector(2, "server name list")
    if not data.done() or names.done():
        raise ClientHelloError("server name extension malformed")
    host: str | None = None
    while not names.done():
        name_type = names.number(1, "server name type")
        name = names.vector(2, "server name").data
        if name_type != _NAME_TYPE_HOST:
            continue  # RFC 6066 3: other types may come; none is defined
        if host is not None:
            raise ClientHelloError("two host names in the server name extension")
        if not name:
            raise ClientHelloError("empty host name")
        try:
            host = name.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ClientHelloError("host name is not ASCII") from exc
    return host


def _alpn(data: _Cursor) -> tuple[bytes, ...]:
    protocols = data.vector(2, "ALPN list")
    if not data.done() or protocols.done():
        raise ClientHelloError("ALPN extension malformed")
    offered = []
    while not protocols.done():
        name = protocols.vector(1, "ALPN protocol").data
        if not name:
            raise ClientHelloError("empty ALPN protocol name")  # RFC 7301 3.1
        offered.append(name)
    return tuple(offered)
