"""Curve25519 key types with the text forms Tailscale uses (`nodekey:<hex>`, `privkey:<hex>`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey as _NaclPrivateKey

KEY_LEN = 32


class KeyError_(ValueError):
    """A key in text or bytes form is malformed."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A node's 32-byte Curve25519 public key; `raw` is what goes on the wire."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyError_(f"public key must be {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Accept `nodekey:<64 hex>`, `mkey:`/`discokey:` prefixed forms, or bare 64 hex chars."""
        body = text.strip()
        if ":" in body:
            prefix, body = body.split(":", 1)
            if prefix not in ("nodekey", "mkey", "discokey"):
                raise KeyError_(f"unknown public key prefix {prefix!r} (want nodekey:)")
        try:
            raw = bytes.fromhex(body)
        except ValueError as exc:
            raise KeyError_(f"public key is not hex: {text!r}") from exc
        return cls(raw)

    def hex(self) -> str:
        return self.raw.hex()

    def nodekey(self) -> str:
        return "nodekey:" + self.raw.hex()

    def short(self) -> str:
        """The key's first 8 hex characters, to name it in log lines and reprs (not Tailscale's
        `[abcde]` ShortString, which is base64)."""
        return self.raw.hex()[:8]

    def __str__(self) -> str:
        return self.nodekey()


@dataclass(frozen=True, slots=True)
class PrivateKey:
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyError_(f"private key must be {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(bytes(_NaclPrivateKey.generate()))

    @classmethod
    def parse(cls, text: str) -> PrivateKey:
        body = text.strip()
        if body.startswith("privkey:"):
            body = body[len("privkey:") :]
        try:
            return cls(bytes.fromhex(body))
        except ValueError as exc:
            raise KeyError_("private key is not `privkey:<64 hex>`") from exc

    def public(self) -> PublicKey:
        return PublicKey(bytes(_NaclPrivateKey(self.raw).public_key))

    def nacl(self) -> _NaclPrivateKey:
        return _NaclPrivateKey(self.raw)

    def text(self) -> str:
        return "privkey:" + self.raw.hex()

    def __repr__(self) -> str:  # never print secrets by accident
        return f"PrivateKey(public={self.public().short()})"


def load_or_create_server_key(path: Path) -> PrivateKey:
    """Load the server's private key from a derper-style JSON file, creating it (0600) if absent.

    The file format matches derper's `derper.key` (`{"PrivateKey": "privkey:<hex>"}`) so an
    operator can move a key between derper and this relay and keep the same server identity.
    """
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return PrivateKey.parse(data["PrivateKey"])
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyError_(f"server key file {path} is not valid: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    key = PrivateKey.generate()
    payload = json.dumps({"PrivateKey": key.text()}).encode()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # Link rather than rename so that two workers racing on first start agree on one key.
        os.link(tmp, path)
    except FileExistsError:
        os.unlink(tmp)
        return load_or_create_server_key(path)
    os.unlink(tmp)
    return key
