"""Start-time checks that a port is free, failing with one line that names the setting and the fix."""

from __future__ import annotations

import errno
import socket

from .config import ConfigError


def check_port_free(host: str, port: int, *, setting: str = "server.listen (--listen)",
                    kind: int = socket.SOCK_STREAM, fix: str = "stop what holds it or pick another port") -> None:
    """Bind without SO_REUSEPORT: that fails if anyone holds the port, another of our clusters included
    (their workers' SO_REUSEPORT sockets would otherwise silently share it with ours)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            what = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            proto = "udp " if kind == socket.SOCK_DGRAM else ""
            raise ConfigError(f"{setting}: {proto}{host}:{port} {what}; {fix}") from exc
