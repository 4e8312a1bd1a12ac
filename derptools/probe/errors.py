"""Why a connection did not come up, as one phrase for the report."""

from __future__ import annotations

import http
import ssl


def describe_connect_error(exc: BaseException, address: str, timeout: float) -> str:
    """One phrase for why a TCP/TLS connection did not come up (used after a check label)."""
    from relay_worker.client import DerpClientError, UpgradeRefused

    if isinstance(exc, UpgradeRefused):
        try:
            phrase = http.HTTPStatus(exc.status).phrase
        except ValueError:
            phrase = "unexpected status"
        body = exc.body.decode("utf-8", "replace").strip().splitlines()
        return f"port refused the upgrade: {exc.status} {phrase}" + (f" ({body[0][:80]})" if body else "")
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s talking to {address}"
    cause = exc.__cause__ if isinstance(exc, DerpClientError) and exc.__cause__ is not None else exc
    if isinstance(cause, ConnectionRefusedError):
        return f"connect refused: {address} connection refused"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: {cause.verify_message or cause.reason}"
    if isinstance(cause, ssl.SSLError):
        hint = " (is it plain HTTP? use an http:// URL or --plain-http)" if cause.reason == "WRONG_VERSION_NUMBER" \
            else ""
        return f"TLS handshake failed: {cause.reason or cause}{hint}"
    if isinstance(cause, OSError):
        return f"connect failed: {address} {cause.strerror or cause}"
    if isinstance(exc, DerpClientError):
        return f"handshake failed: {exc}"
    return f"failed: {exc!r}"
