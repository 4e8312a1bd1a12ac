"""The DERP handshake's boxes: ClientInfo and ServerInfo JSON sealed with NaCl crypto_box."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import nacl.utils
from nacl.public import Box
from nacl.public import PublicKey as NaclPublicKey

from .frames import (
    NONCE_LEN,
    PROTOCOL_VERSION,
    Payload,
    ProtocolError,
    build_client_info,
    build_server_info,
    parse_client_info,
    parse_server_info,
)
from .keys import PrivateKey


@dataclass(slots=True)
class ClientInfo:
    """What a client tells the server in its sealed ClientInfo JSON."""

    version: int = PROTOCOL_VERSION
    mesh_key: str = ""
    can_ack_pings: bool = False
    is_prober: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """As Go marshals derp.ClientInfo: field order meshKey (omitzero), version (omitempty),
        CanAckPings (always), IsProber (omitempty)."""
        doc: dict[str, Any] = {}
        if self.mesh_key:
            doc["meshKey"] = self.mesh_key
        if self.version:
            doc["version"] = self.version
        doc["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            doc["IsProber"] = True
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ClientInfo:
        """Go's encoding/json into derp.ClientInfo: field names match case-insensitively (the last
        match wins), a present meshKey must be exactly 64 hex digits (key.DERPMesh; `null`, `""`
        and padded keys fail), and the booleans must be booleans (null leaves them false)."""
        doc = _json_object(raw, "ClientInfo")
        folded = {name.lower(): value for name, value in doc.items()}
        version = folded.get("version", 0)
        if version is None:
            version = 0
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProtocolError("ClientInfo version is not an integer")
        mesh_key = ""
        if "meshkey" in folded:
            value = folded["meshkey"]
            if not (isinstance(value, str) and is_hex32(value)):
                raise ProtocolError("ClientInfo meshKey is not 64 hex digits")
            mesh_key = value.lower()
        flags = []
        for name in ("canackpings", "isprober"):
            value = folded.get(name)
            if value is not None and not isinstance(value, bool):
                raise ProtocolError(f"ClientInfo {name} is not a boolean")
            flags.append(bool(value))
        return cls(version=version, mesh_key=mesh_key, can_ack_pings=flags[0], is_prober=flags[1], extra=doc)


@dataclass(slots=True)
class ServerInfo:
    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"version": self.version}
        if self.token_bucket_bytes_per_second:
            doc["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            doc["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ServerInfo:
        doc = _json_object(raw, "ServerInfo")
        values = []
        for name in ("version", "TokenBucketBytesPerSecond", "TokenBucketBytesBurst"):
            value = doc.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
                raise ProtocolError(f"ServerInfo field {name} is not a non-negative integer")
            values.append(value)
        return cls(*values)


_HEX = frozenset("0123456789abcdefABCDEF")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Parse a handshake JSON document; anything a peer can send maps to ProtocolError."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: deeply nested arrays fit in the 256 KiB ClientInfo cap
        raise ProtocolError(f"{what} is not JSON: {type(exc).__name__}") from exc
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what} JSON is not an object")
    return doc


def _box(private: PrivateKey, peer_public: bytes) -> Box:
    return Box(private.nacl(), NaclPublicKey(peer_public))


def seal_client_info(client: PrivateKey, server_public: bytes, info: ClientInfo) -> bytes:
    """The whole ClientInfo frame a client sends."""
    nonce = nacl.utils.random(NONCE_LEN)
    sealed = _box(client, server_public).encrypt(info.to_json(), nonce).ciphertext
    return build_client_info(client.public().raw, nonce, sealed)


class ServerHandshake:
    """The server's side of the handshake, keeping its NaCl key object across handshakes and one
    Box per client for both opening ClientInfo and sealing ServerInfo (the box's shared-key
    precomputation is most of a handshake's CPU)."""

    __slots__ = ("_private",)

    def __init__(self, server: PrivateKey) -> None:
        self._private = server.nacl()

    def open_client_info(self, payload: Payload) -> tuple[bytes, ClientInfo, Box]:
        client_public, nonce, sealed = parse_client_info(payload)
        try:
            box = Box(self._private, NaclPublicKey(client_public))
            plain = box.decrypt(sealed, nonce)
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise ProtocolError("ClientInfo box does not open with the client's key") from exc
        return client_public, ClientInfo.from_json(plain), box

    @staticmethod
    def seal_server_info(box: Box, info: ServerInfo) -> bytes:
        nonce = nacl.utils.random(NONCE_LEN)
        return build_server_info(nonce, box.encrypt(info.to_json(), nonce).ciphertext)


def open_client_info(server: PrivateKey, payload: Payload) -> tuple[bytes, ClientInfo]:
    """Open a ClientInfo payload: return (client public key, info) or raise ProtocolError."""
    opened = ServerHandshake(server).open_client_info(payload)
    return opened[0], opened[1]


def seal_server_info(server: PrivateKey, client_public: bytes, info: ServerInfo) -> bytes:
    """The whole ServerInfo frame the server sends after admitting a client."""
    return ServerHandshake.seal_server_info(_box(server, client_public), info)


def open_server_info(client: PrivateKey, server_public: bytes, payload: bytes) -> ServerInfo:
    nonce, sealed = parse_server_info(payload)
    try:
        plain = _box(client, server_public).decrypt(sealed, nonce)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise ProtocolError("ServerInfo box does not open with the server's key") from exc
    return ServerInfo.from_json(plain)


def is_hex32(text: str) -> bool:
    """64 hex characters: a mesh key or a SHA-256 as derper writes them."""
    return len(text) == 64 and all(c in _HEX for c in text)


def mesh_key_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison of mesh keys (64 hex chars); an empty expected key matches nothing."""
    if not expected or not presented:
        return False
    return hmac.compare_digest(presented.strip().lower().encode(), expected.strip().lower().encode())
