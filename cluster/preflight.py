"""Every setting a worker would refuse, checked once by the supervisor before any worker starts.

A bad value is then one line and exit 2 (cli.py turns ConfigError into that) instead of N workers
crashing in a restart loop. Workers take the supervisor's validated values as they are
(config.trusted_config) and share the readers below, so a check lives in one place only.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit

from relay_worker.handshake import is_hex32

from .config import SETTINGS_BY_KEY, Config, ConfigError

_MESH_KEY_SETTING = "server.mesh_key_file (--mesh-key-file / -mesh-psk-file)"


def read_mesh_key(path: str) -> str:
    """derper's mesh key (64 hex characters, lower-cased), or "" when no file is set."""
    if not path:
        return ""
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{_MESH_KEY_SETTING}: cannot read {path}: {exc.strerror}") from exc
    if not is_hex32(key):
        raise ConfigError(f"{_MESH_KEY_SETTING}: {path} must hold 64 hex characters (derper's mesh key format)")
    return key.lower()


def read_rate_config(path: str) -> tuple[int, int]:
    """derper's --rate-config file as (rate, burst); the worker reloads it on SIGHUP."""
    from relay_worker.ratelimit import load_rate_config

    try:
        return load_rate_config(path)
    except ValueError as exc:
        raise ConfigError(f"limits.rate_config (--rate-config): {exc}; fix the file or leave the setting out") from exc


def preflight(config: Config) -> list[str]:
    """Raise ConfigError (one line naming the key and the fix) for the first setting that cannot
    work; return the lines worth printing (the selfsigned certificate's pin)."""
    check_values(config)
    check_files(config)
    return check_ports_and_tls(config)


def check_values(config: Config) -> None:
    """Ranges and combinations the table's converters (config.py) cannot see one value at a time."""
    v = config.values
    if config.listen_addr[1] == 0:
        raise ConfigError("server.listen (--listen): workers share the port, so it cannot be 0")
    for key in ("admission.timeout", "limits.handshake_timeout", "limits.http_read_timeout", "node.dead_after"):
        if v[key] <= 0:
            raise ConfigError(f"{key} ({SETTINGS_BY_KEY[key].flag}): must be > 0 seconds")
    for key in ("limits.accept_connection_limit", "limits.accept_connection_limit_per_ip", "admission.cache_ttl",
                "limits.tcp_write_timeout", "server.worker_liveness_timeout"):
        if v[key] < 0:
            raise ConfigError(f"{key} ({SETTINGS_BY_KEY[key].flag}): must be >= 0 (0 = off)")
    for key in ("limits.bytes_per_second", "limits.bytes_burst", "limits.accept_connection_burst",
                "limits.max_clients", "server.shutdown_timeout"):
        if v[key] < 0:
            raise ConfigError(f"{key} ({SETTINGS_BY_KEY[key].flag}): must be >= 0 (0 = unlimited)")
    if v["server.mesh_with"] and not v["server.mesh_key_file"]:
        raise ConfigError("server.mesh_with (--mesh-with): meshing with derpers needs their mesh key; "
                          "pass --mesh-key-file / -mesh-psk-file FILE")
    url = v["admission.verify_client_url"]
    if url:
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"admission.verify_client_url (--verify-client-url): {url!r} is not an "
                              "http(s)://HOST[:PORT]/PATH URL")


def check_files(config: Config) -> None:
    """The files and directories workers read or write at start."""
    v = config.values
    state = config.state_path
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"server.state_dir (--state-dir): cannot write to {state}: {exc.strerror}; "
                          "pick a directory this user can write (it holds the server key)") from exc
    from relay_worker.keys import KeyError_, load_or_create_server_key

    key_path = config.server_key_path
    try:
        load_or_create_server_key(key_path)
    except OSError as exc:
        raise ConfigError(f"server.key_file (--key-file / -c): cannot read or create {key_path}: "
                          f"{exc.strerror}; point it at a writable path") from exc
    except KeyError_ as exc:  # not derper's {"PrivateKey": "privkey:..."} JSON
        raise ConfigError(f"server.key_file (--key-file / -c): {exc}; fix or remove the file "
                          "(a new key is created when it is missing)") from exc
    read_mesh_key(v["server.mesh_key_file"])
    if v["limits.rate_config"]:
        read_rate_config(v["limits.rate_config"])
    if v["server.admin_token_file"] and not v["server.admin_token"]:
        try:
            Path(v["server.admin_token_file"]).read_text()
        except OSError as exc:
            raise ConfigError(f"server.admin_token_file (--admin-token-file): cannot read "
                              f"{v['server.admin_token_file']}: {exc.strerror}") from exc
    if v["admission.verify_clients"]:
        sock = v["admission.tailscaled_socket"] or "/var/run/tailscale/tailscaled.sock"
        try:
            is_socket = stat.S_ISSOCK(os.stat(sock).st_mode)
        except OSError as exc:
            raise ConfigError(f"admission.tailscaled_socket (--tailscaled-socket / -socket): --verify-clients "
                              f"needs tailscaled's socket, and {sock}: {exc.strerror}; start tailscaled or "
                              "point -socket at its socket") from exc
        if not is_socket:
            raise ConfigError(f"admission.tailscaled_socket (--tailscaled-socket / -socket): {sock} is not a "
                              "unix socket; point it at tailscaled's socket")
    if v["admission.allow_keys_file"] and not Path(v["admission.allow_keys_file"]).is_file():
        raise ConfigError(f"admission.allow_keys_file (--allow-keys-file): {v['admission.allow_keys_file']} "
                          "does not exist; create it (one nodekey:<hex> per line)")
    if config.node_mesh_secret_file:
        from mesh.curve import MeshSecretError, read_secret_file

        try:
            read_secret_file(Path(config.node_mesh_secret_file))
        except MeshSecretError as exc:
            raise ConfigError(f"node.mesh_secret_file (--mesh-secret-file): {exc}") from exc


def check_ports_and_tls(config: Config) -> list[str]:
    """The ports workers bind and the certificate they serve; returns lines worth printing."""
    from .http_port import check_http_port
    from .ports import check_port_free
    from .tls import check_tls_config

    host, port = config.listen_addr
    check_port_free(host, port)
    check_http_port(config)
    if config.values["server.certmode"] == "letsencrypt":
        from .acme import preflight as acme_preflight

        acme_preflight(config)
    tls_note = check_tls_config(config)
    stun = config.stun_addr
    if stun is not None:
        check_port_free(*stun, setting="stun.listen (--stun)", kind=socket.SOCK_DGRAM,
                        fix="pick another port or --no-stun")
    mesh = config.mesh_addr
    if mesh is not None:
        for index in range(config.worker_count):
            try:
                check_port_free(mesh[0], mesh[1] + index)
            except ConfigError as exc:
                raise ConfigError(f"node.mesh_listen (--mesh-listen): worker {index} needs port "
                                  f"{mesh[1] + index}, which is in use; pick another base port") from exc
    return [tls_note] if tls_note else []
