"""Cluster mesh secret -> CURVE keys, and the ZAP check that admits only holders of the secret.

Scheme: `cluster keygen` writes 32 random bytes (hex) to a 0600 file. Every node derives from it,
with BLAKE2b keyed by a fixed purpose string, one Curve25519 keypair that all members of the
cluster share. Every inbox is a CURVE server with that keypair; every sender is a CURVE client with
the same keypair and the same server key. A sender without the secret cannot complete the CURVE
handshake (it does not know the server key, and its own key would not be the shared one), and the
ZAP handler additionally refuses any client key other than the derived public key. Traffic is
encrypted and authenticated per connection by CurveZMQ; nothing unauthenticated is ever delivered.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import zmq
import zmq.auth.thread
from nacl.bindings import crypto_scalarmult_base

from .transport import CurveKeys

SECRET_BYTES = 32
_PURPOSE = b"derp-cluster mesh CURVE v1"


class MeshSecretError(ValueError):
    pass


def generate_secret_file(path: Path) -> None:
    """Write a new cluster mesh secret, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(SECRET_BYTES) + "\n")


def read_secret_file(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise MeshSecretError(f"cannot read mesh secret {path}: {exc.strerror}") from exc
    try:
        secret = bytes.fromhex(text)
    except ValueError as exc:
        raise MeshSecretError(f"mesh secret {path} is not hex (make one with `cluster keygen --out FILE`)") from exc
    if len(secret) < 16:
        raise MeshSecretError(f"mesh secret {path} is too short: want at least 16 bytes")
    return secret


def derive_curve_keys(secret: bytes) -> CurveKeys:
    seed = hashlib.blake2b(secret, key=_PURPOSE, digest_size=32).digest()
    # Clamp as X25519 does, so the scalar is a valid Curve25519 secret key.
    scalar = bytearray(seed)
    scalar[0] &= 248
    scalar[31] &= 127
    scalar[31] |= 64
    public = crypto_scalarmult_base(bytes(scalar))
    public_z85 = zmq.utils.z85.encode(public)
    return CurveKeys(public=public_z85, secret=zmq.utils.z85.encode(bytes(scalar)), server_public=public_z85)


class _OnlyClusterKeys:
    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return secrets.compare_digest(zmq.utils.z85.encode(key) if len(key) == 32 else key, self.allowed)


def start_authenticator(context: zmq.Context, keys: CurveKeys) -> zmq.auth.thread.ThreadAuthenticator:  # type: ignore[type-arg]
    """A ZAP handler (one thread per process, not per message) admitting only the cluster key."""
    auth = zmq.auth.thread.ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_OnlyClusterKeys(keys.public))
    return auth
