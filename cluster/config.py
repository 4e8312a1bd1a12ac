"""Cluster configuration: one table of settings, filled from defaults, a TOML file, DERP_* variables
and command-line flags (later sources win).

Every setting is declared once in SETTINGS, which drives the TOML keys, the environment variables
that derper images use, the `cluster up` flags and the validation, so the four can never disagree.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A setting is wrong; the message is one line naming the key and the fix."""


def parse_hostport(text: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """Parse `HOST:PORT`, `:PORT`, `[v6]:PORT` or a bare port."""
    text = text.strip()
    if text.isdigit():
        host, port_text = default_host, text
    elif text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT")
        host = host or default_host
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def parse_listen(text: str) -> tuple[str, int]:
    """A DERP or STUN listen address: as parse_hostport, but `:PORT` is every address of both
    families (`::` with IPV6_V6ONLY off), as Go's net.Listen(":443") is (derper-parity D7)."""
    host, port = parse_hostport(text)
    return ("::" if text.strip().startswith(":") and _dual_stack() else host), port


def _dual_stack() -> bool:
    """Whether this host can listen on `::` (Go falls back to IPv4 where it cannot, and so do we)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "t", "true", "yes", "on"):  # t/f: Go's strconv.ParseBool, as derper's flags
        return True
    if low in ("0", "f", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def _hostport(text: str | Any) -> str:
    if not isinstance(text, str):
        raise ValueError("want a string HOST:PORT")
    parse_hostport(text)
    return text


def _list(text: str | list[str]) -> list[str]:
    if isinstance(text, list):
        return [str(item) for item in text]
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(text: Any) -> str:
        value = str(text).strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return check


def _int(text: Any) -> int:
    if isinstance(text, bool):
        raise ValueError("want an integer")
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not an integer") from None


def _port(low: int) -> Callable[[Any], int]:
    """A TCP/UDP port number; values below 1 down to `low` are the setting's off/auto values."""

    def check(text: Any) -> int:
        port = _int(text)
        if not (low <= port <= 65535):
            raise ValueError(f"{port} is not a port (want 1-65535{', or ' + str(low) if low < 1 else ''})")
        return port

    return check


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: Any) -> float:
    """Seconds, from a number of seconds or a Go duration such as 15s, 10m, 1h30m, 500ms."""
    if isinstance(text, bool):
        raise ValueError("want a duration such as 15s or 10m")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        import re

        raw = str(text).strip()
        try:
            seconds = float(raw)
        except ValueError:
            parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", raw)
            if not parts or "".join(n + u for n, u in parts) != raw:
                raise ValueError(f"{raw!r} is not a duration such as 15s, 10m or 1h30m") from None
            seconds = sum(float(n) * _GO_UNITS[u] for n, u in parts)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"{text!r} is not a finite duration")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _rate(text: Any) -> float:
    """A rate; derper's +Inf (its default, unlimited) is our 0."""
    if str(text).strip().lower() in ("inf", "+inf", "infinity", "+infinity"):
        return 0.0
    return _float(text)


def _burst(text: Any) -> int:
    value = _int(text)
    return 0 if value >= 2**63 - 1 else value  # derper's default math.MaxInt: no limit


def _mesh_with(text: Any) -> list[str]:
    """Stock derpers to mesh with: our URL form (https://host/derp) or derper's -mesh-with form
    (host or host/dialhost). Normalised to URLs; a dial host rides in the fragment (#dial=HOST),
    which is never sent, and the TLS name stays the derper's hostname as in derper."""
    out = []
    for item in _list(text):
        if "://" in item:
            out.append(item)
            continue
        parts = item.split("/")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"{item!r}: want HOST or HOST/DIALHOST (derper) or https://HOST/derp")
        url = f"https://{parts[0]}/derp"
        out.append(url + (f"#dial={parts[1]}" if len(parts) == 2 and parts[1] != parts[0] else ""))
    return out


def _float(text: Any) -> float:
    if isinstance(text, bool):
        raise ValueError("want a number")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _str(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError("want a string")
    return text


def _home(text: Any) -> str:
    """derper's -home: empty, "blank", or an http(s) URL."""
    value = _str(text)
    if value in ("", "blank") or value.startswith(("http://", "https://")):
        return value
    raise ValueError(f"{value!r} is not empty, \"blank\" or an http(s):// URL")


@dataclass(frozen=True)
class Setting:
    key: str  # "section.name" in TOML; the attribute is the name with the section prefix
    convert: Callable[[Any], Any]
    default: Any
    help: str
    env: str | None = None
    flag: str | None = None

    @property
    def attr(self) -> str:
        section, name = self.key.split(".", 1)
        return name if section == "server" else f"{section}_{name}"


SETTINGS: tuple[Setting, ...] = (
    Setting("server.listen", _hostport, "0.0.0.0:3340", "DERP HTTP(S) address HOST:PORT", "DERP_ADDR",
            "--listen"),
    Setting("server.workers", _int, 0, "worker processes (0 = one per core)", "DERP_WORKERS", "--workers"),
    Setting("server.hostname", _str, "", "public DNS name of this node (TLS name, derpMap HostName)",
            "DERP_DOMAIN", "--hostname"),
    Setting("server.certmode", _choice("dev", "manual", "selfsigned", "letsencrypt"), "dev",
            "dev = plain HTTP; manual = CERTDIR/HOSTNAME.crt+.key; selfsigned = generated cert; "
            "letsencrypt = ACME (HTTP-01 on the http port), cached in CERTDIR",
            "DERP_CERT_MODE", "--certmode"),
    Setting("server.certdir", _str, "/var/lib/derper/certs", "directory holding HOSTNAME.crt and .key",
            "DERP_CERT_DIR", "--certdir"),
    Setting("server.http_port", _port(-1), -1,
            "plain-HTTP port for /generate_204 captive-portal checks when serving TLS (-1 = off)",
            "DERP_HTTP_PORT", "--http-port"),
    Setting("server.state_dir", _str, "state", "directory for the server key (derp.key)",
            "DERP_STATE_DIR", "--state-dir"),
    Setting("server.key_file", _str, "",
            "the server's private key, derper's -c file {\"PrivateKey\": \"privkey:...\"} (default STATE_DIR/derp.key)",
            "DERP_KEY_FILE", "--key-file"),
    Setting("server.derp", _bool, True,
            "serve DERP at /derp (false: STUN, /bootstrap-dns and the home page only, as derper -derp=false)",
            "DERP_DERP", "--derp"),
    Setting("server.acme_email", _str, "", "contact address for the ACME account (certmode letsencrypt)",
            "DERP_ACME_EMAIL", "--acme-email"),
    Setting("server.acme_directory", _str, "https://acme-v02.api.letsencrypt.org/directory",
            "ACME directory URL (certmode letsencrypt)", "DERP_ACME_DIRECTORY", "--acme-directory"),
    Setting("server.acme_ip_certs", _bool, False,
            "certmode letsencrypt: Let's Encrypt certs for this node's IP addresses, for clients that connect by IP",
            "DERP_ACME_IP_CERTS", "--acme-ip-certs"),
    Setting("server.acme_ca_file", _str, "",
            "PEM CA bundle to trust for the ACME directory (default: the system store)",
            "DERP_ACME_CA_FILE", "--acme-ca-file"),
    Setting("server.run_dir", _str, "", "directory for ipc sockets and pid files (default STATE_DIR/run)",
            "DERP_RUN_DIR", "--run-dir"),
    Setting("server.log_level", _choice("debug", "info", "warning", "error"), "info", "log level",
            "DERP_LOG_LEVEL", "--log-level"),
    Setting("server.admin_token", _str, "", "token that opens admin paths to non-loopback callers",
            "DERP_ADMIN_TOKEN", "--admin-token"),
    Setting("server.admin_token_file", _str, "", "file holding the admin token", "DERP_ADMIN_TOKEN_FILE",
            "--admin-token-file"),
    # the supervisor (cluster/supervisor.py): its liveness ping and its one shutdown deadline
    Setting("server.worker_liveness_timeout", _duration, 30.0,
            "seconds a serving worker may leave the supervisor's liveness ping unanswered before it is killed "
            "and restarted (0 = never)", None, "--worker-liveness-timeout"),
    Setting("server.shutdown_timeout", _duration, 10.0,
            "seconds all workers together get to drain after SIGTERM before they are killed", None,
            "--shutdown-timeout"),
    Setting("server.mesh_key_file", _str, "",
            "file with derper's mesh key (64 hex): peers presenting it may WatchConns/ForwardPacket",
            "DERP_MESH_KEY_FILE", "--mesh-key-file"),
    Setting("server.mesh_with", _mesh_with, [],
            "stock derpers to mesh with: https://HOST/derp or derper's HOST[/DIALHOST] (comma separated)",
            "DERP_MESH_WITH", "--mesh-with"),
    Setting("stun.enabled", _bool, True, "serve STUN", "DERP_STUN", None),
    Setting("stun.listen", _hostport, "0.0.0.0:3478", "STUN UDP address HOST:PORT", None, "--stun"),
    Setting("stun.port", _port(0), 0, "STUN port (overrides the port of stun.listen when set)",
            "DERP_STUN_PORT", None),
    Setting("admission.verify_clients", _bool, False, "admit only nodes tailscaled's LocalAPI knows",
            "DERP_VERIFY_CLIENTS", "--verify-clients"),
    Setting("admission.tailscaled_socket", _str, "/var/run/tailscale/tailscaled.sock",
            "tailscaled LocalAPI unix socket", "DERP_TAILSCALED_SOCKET", "--tailscaled-socket"),
    Setting("admission.verify_client_url", _str, "", "URL to POST {NodePublic, Source} to for admission",
            "DERP_VERIFY_CLIENT_URL", "--verify-client-url"),
    Setting("admission.verify_client_url_fail_open", _bool, True,
            "admit clients when the verify URL is unreachable", "DERP_VERIFY_CLIENT_URL_FAIL_OPEN",
            "--verify-client-url-fail-open"),
    Setting("admission.allow_keys_file", _str, "", "file of allowed nodekey: lines (reloaded on change)",
            "DERP_ALLOW_KEYS_FILE", "--allow-keys-file"),
    Setting("admission.cache_ttl", _float, 0.0,
            "seconds an admission decision is cached per node key (0 = ask on every connection, as derper)",
            "DERP_ADMISSION_CACHE_TTL", "--admission-cache-ttl"),
    Setting("admission.timeout", _float, 5.0, "seconds an admission lookup may take",
            "DERP_ADMISSION_TIMEOUT", "--admission-timeout"),
    Setting("limits.bytes_per_second", _int, 0, "per-client relay rate (0 = unlimited)",
            "DERP_CLIENT_BYTES_PER_SECOND", "--client-bytes-per-second"),
    Setting("limits.bytes_burst", _int, 0, "per-client relay burst in bytes", "DERP_CLIENT_BYTES_BURST",
            "--client-bytes-burst"),
    Setting("limits.accept_connection_limit", _rate, 0.0, "accepted connections per second per worker "
            "(0 = unlimited)", "DERP_ACCEPT_CONNECTION_LIMIT", "--accept-connection-limit"),
    Setting("limits.accept_connection_burst", _burst, 0, "accept burst per worker",
            "DERP_ACCEPT_CONNECTION_BURST", "--accept-connection-burst"),
    Setting("limits.accept_connection_limit_per_ip", _float, 0.0,
            "accepted connections per second per source IP per worker (0 = unlimited)",
            "DERP_ACCEPT_CONNECTION_LIMIT_PER_IP", "--accept-connection-limit-per-ip"),
    Setting("limits.tcp_user_timeout", _duration, 15.0,
            "TCP_USER_TIMEOUT of client connections, seconds or 15s-style (derper -tcp-user-timeout)",
            "DERP_TCP_USER_TIMEOUT", "--tcp-user-timeout"),
    Setting("limits.tcp_keepalive_time", _duration, 600.0,
            "TCP keepalive idle time of client connections (derper -tcp-keepalive-time)",
            "DERP_TCP_KEEPALIVE_TIME", "--tcp-keepalive-time"),
    Setting("limits.max_clients", _int, 0, "max DERP clients per worker (0 = unlimited)",
            "DERP_MAX_CLIENTS", "--max-clients"),
    Setting("limits.handshake_timeout", _float, 10.0, "seconds for each handshake step",
            "DERP_HANDSHAKE_TIMEOUT", "--handshake-timeout"),
    # the HTTP edge (relay_worker/http_protocol.py, http_app.py): derper's -home, -bootstrap-dns-names,
    # -unpublished-bootstrap-dns-names, and its http.Server ReadTimeout
    Setting("server.home", _home, "", 'what "/" serves: empty = the default page, "blank", or a URL to redirect to',
            "DERP_HOME", "--home"),
    Setting("server.bootstrap_dns_names", _str, "", "comma-separated hostnames to publish at /bootstrap-dns",
            "DERP_BOOTSTRAP_DNS_NAMES", "--bootstrap-dns-names"),
    Setting("server.unpublished_bootstrap_dns_names", _str, "",
            "comma-separated hostnames answered at /bootstrap-dns?q=NAME only", "DERP_UNPUBLISHED_BOOTSTRAP_DNS_NAMES",
            "--unpublished-bootstrap-dns-names"),
    Setting("limits.http_read_timeout", _float, 30.0,
            "seconds for an HTTP request (head to response) and for keep-alive idle", "DERP_HTTP_READ_TIMEOUT",
            "--http-read-timeout"),
    # relay write deadline (derper's --tcp-write-timeout): a client whose connection has held
    # unflushed bytes this long is dropped; mesh peers get 30 s, as in derper
    Setting("limits.tcp_write_timeout", _float, 2.0,
            "seconds a client may leave written bytes unflushed before it is dropped (0 = never)",
            "DERP_TCP_WRITE_TIMEOUT", "--tcp-write-timeout"),
    # derper's --rate-config JSON file; reloaded on SIGHUP; overrides --client-bytes-*
    Setting("limits.rate_config", _str, "",
            "derper's per-client rate JSON file {PerClientRateLimitBytesPerSec, PerClientRateBurstBytes}",
            "DERP_RATE_CONFIG", "--rate-config"),
    Setting("node.name", _str, "", "this node's name in the cluster (default: the hostname)",
            "DERP_NODE_NAME", "--node-name"),
    Setting("node.region_id", _int, 900, "derpMap region ID (custom regions start at 900)",
            "DERP_REGION_ID", "--region-id"),
    Setting("node.region_code", _str, "self", "derpMap region code", "DERP_REGION_CODE", "--region-code"),
    Setting("node.region_name", _str, "Self-hosted", "derpMap region name", "DERP_REGION_NAME",
            "--region-name"),
    Setting("node.mesh_listen", _str, "", "inter-node ZeroMQ address HOST:PORT (empty = single node)",
            "DERP_MESH_LISTEN", "--mesh-listen"),
    Setting("node.mesh_advertise", _str, "",
            "host other nodes use to reach this node's mesh ports (default: the mesh_listen host)",
            "DERP_MESH_ADVERTISE", "--mesh-advertise"),
    Setting("node.join", _list, [], "seed nodes HOST:PORT to join (comma separated)", "DERP_JOIN",
            "--join"),
    Setting("node.mesh_secret_file", _str, "", "cluster mesh secret from `cluster keygen`",
            "DERP_MESH_SECRET_FILE", "--mesh-secret-file"),
    Setting("node.dead_after", _float, 10.0, "seconds of silence before a node is declared dead",
            "DERP_NODE_DEAD_AFTER", "--node-dead-after"),
    # mesh gossip bounds (docs/MESH.md, "Horizon" and "Liveness")
    Setting("node.tombstone_horizon", _float, 120.0,
            "seconds a removed key's tombstone (and an unrenewed entry) lives in the directory",
            "DERP_TOMBSTONE_HORIZON", "--tombstone-horizon"),
    Setting("node.busy_grace", _float, 30.0,
            "extra seconds a member whose loop lags but whose process is alive keeps its keys",
            "DERP_BUSY_GRACE", "--busy-grace"),
)

SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}
#: settings that are on/off switches get `--flag`/`--no-flag` on the command line
_BOOL_FLAGS = {"admission.verify_clients", "admission.verify_client_url_fail_open", "server.derp"}


@dataclass
class Config:
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    regions: list[dict[str, Any]] = field(default_factory=list)

    def __getattr__(self, attr: str) -> Any:
        for setting in SETTINGS:
            if setting.attr == attr:
                return self.values[setting.key]
        raise AttributeError(attr)

    def get(self, key: str) -> Any:
        return self.values[key]

    # derived values ------------------------------------------------------------------------------

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_listen(self.values["server.listen"])

    @property
    def stun_addr(self) -> tuple[str, int] | None:
        if not self.values["stun.enabled"]:
            return None
        host, port = parse_listen(self.values["stun.listen"])
        return host, self.values["stun.port"] or port

    @property
    def tls(self) -> bool:
        return str(self.values["server.certmode"]) != "dev"

    @property
    def worker_count(self) -> int:
        return self.values["server.workers"] or (os.cpu_count() or 1)

    @property
    def state_path(self) -> Path:
        return Path(self.values["server.state_dir"]).resolve()

    @property
    def server_key_path(self) -> Path:
        key_file = self.values["server.key_file"]
        return Path(key_file).resolve() if key_file else self.state_path / "derp.key"

    @property
    def run_path(self) -> Path:
        run = self.values["server.run_dir"]
        return Path(run).resolve() if run else self.state_path / "run"

    @property
    def mesh_addr(self) -> tuple[str, int] | None:
        listen = self.values["node.mesh_listen"]
        return parse_hostport(listen) if listen else None

    def mesh_advertise_host(self) -> str:
        if self.values["node.mesh_advertise"]:
            return str(self.values["node.mesh_advertise"])
        addr = self.mesh_addr
        if addr is None:
            return ""
        if addr[0] not in ("0.0.0.0", "::", ""):
            return addr[0]
        import socket

        return socket.getfqdn()

    @property
    def node_name(self) -> str:
        return self.values["node.name"] or os.uname().nodename

    def admin_token_value(self) -> str:
        if self.values["server.admin_token"]:
            return str(self.values["server.admin_token"])
        path = self.values["server.admin_token_file"]
        return Path(path).read_text().strip() if path else ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)


def trusted_config(values: Mapping[str, Any]) -> Config:
    """A worker's configuration: the values its supervisor validated (load_config, then
    cluster/preflight.py) and passed on, taken as they are so every check runs once."""
    missing = [setting.key for setting in SETTINGS if setting.key not in values]
    if missing:
        raise ConfigError(f"{missing[0]}: missing from the supervisor's settings; start workers with `cluster up`")
    return Config(values=dict(values), sources=dict.fromkeys(values, "supervisor"))


def _apply(config: Config, key: str, raw: Any, source: str) -> None:
    setting = SETTINGS_BY_KEY[key]
    try:
        config.values[key] = setting.convert(raw)
    except (ValueError, TypeError) as exc:
        kind, _, name = source.partition(":")
        where = {"env": setting.env, "flag": name or setting.flag}.get(kind) or key
        raise ConfigError(f"{where} ({key}): {exc}; {setting.help}") from exc
    config.sources[key] = source


def load_config(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration: defaults < TOML file < DERP_* env < flags."""
    config = Config()
    for setting in SETTINGS:
        config.values[setting.key] = setting.default
        config.sources[setting.key] = "default"
    if file:
        path = Path(file)
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"--config: {path} does not exist; pass an existing TOML file") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from exc
        for section, body in doc.items():
            if section == "regions":
                config.regions = _check_regions(body)
                continue
            if not isinstance(body, dict):
                raise ConfigError(f"{section}: expected a [{section}] table in {path}")
            for name, raw in body.items():
                key = f"{section}.{name}"
                if key not in SETTINGS_BY_KEY:
                    raise ConfigError(f"{key}: unknown setting in {path}; see `cluster up --help`")
                _apply(config, key, raw, f"file:{path}")
    for setting in SETTINGS:
        if env is not None and setting.env and setting.env in env and env[setting.env] != "":
            _apply(config, setting.key, env[setting.env], f"env:{setting.env}")
    for key, raw in (flags or {}).items():
        if raw is not None:
            _apply(config, key, raw, f"flag:{(flag_names or {}).get(key) or SETTINGS_BY_KEY[key].flag}")
    _validate(config)
    return config


def _check_regions(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, list):
        raise ConfigError("regions: expected [[regions]] tables, each with region_id and nodes")
    for region in body:
        if not isinstance(region, dict) or not isinstance(region.get("region_id"), int):
            raise ConfigError("regions: every [[regions]] needs an integer region_id")
        if not isinstance(region.get("nodes", []), list):
            raise ConfigError(f"regions.{region['region_id']}.nodes: expected a list of node tables")
    return body


def _validate(config: Config) -> None:
    v = config.values
    if v["server.certmode"] == "manual" and not v["server.hostname"]:
        raise ConfigError("server.hostname (--hostname / DERP_DOMAIN): certmode manual needs the hostname "
                          "whose HOSTNAME.crt/.key to load")
    if v["server.workers"] < 0:
        raise ConfigError("server.workers (--workers): must be >= 0 (0 = one per core)")
    if not 900 <= v["node.region_id"] <= 65535:
        raise ConfigError("node.region_id (--region-id): custom DERP regions use IDs 900 and up")
    if v["limits.bytes_burst"] and not v["limits.bytes_per_second"]:
        raise ConfigError("limits.bytes_burst (--client-bytes-burst): set --client-bytes-per-second too")
    if v["node.mesh_listen"]:
        try:
            parse_hostport(v["node.mesh_listen"])
        except ValueError as exc:
            raise ConfigError(f"node.mesh_listen (--mesh-listen): {exc}; want HOST:PORT") from exc
    for seed in v["node.join"]:
        try:
            parse_hostport(seed)
        except ValueError as exc:
            raise ConfigError(f"node.join (--join): {seed!r}: {exc}; want HOST:PORT[,HOST:PORT]") from exc
    if v["node.join"] and not v["node.mesh_listen"]:
        raise ConfigError("node.join (--join): joining other nodes needs --mesh-listen HOST:PORT too")
    if (v["node.mesh_listen"] or v["node.join"]) and not v["node.mesh_secret_file"]:
        hosts = [parse_hostport(v["node.mesh_listen"])[0]] if v["node.mesh_listen"] else []
        hosts += [parse_hostport(seed)[0] for seed in v["node.join"]]
        if v["node.mesh_advertise"]:
            hosts.append(v["node.mesh_advertise"])
        if not all(_is_loopback_host(host) for host in hosts):
            raise ConfigError("node.mesh_secret_file (--mesh-secret-file): meshing beyond loopback needs the "
                              "cluster secret; create one with `cluster keygen --out FILE`")
    silence = v["node.busy_grace"] + max(3.0, v["node.dead_after"])
    if v["node.busy_grace"] < 0 or v["node.tombstone_horizon"] < 2 * silence:
        raise ConfigError("node.tombstone_horizon (--tombstone-horizon): must be >= 2 x (busy_grace + dead_after), "
                          "so a live member's keys outlast its silence (docs/MESH.md, Horizon)")
    if v["admission.verify_client_url"] and not v["admission.verify_client_url"].startswith(
        ("http://", "https://")
    ):
        raise ConfigError("admission.verify_client_url (--verify-client-url): must be an http(s):// URL")


def _is_loopback_host(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting that has one; values stay None unless given."""
    for setting in SETTINGS:
        if not setting.flag:
            continue
        dest = "cfg:" + setting.key
        if setting.key in _BOOL_FLAGS:
            parser.add_argument(setting.flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=setting.help)
        else:
            parser.add_argument(setting.flag, dest=dest, default=None, metavar=setting.key.split(".")[1]
                                .upper(), help=f"{setting.help} (default: {setting.default!r})")
    parser.add_argument("--no-stun", dest="cfg:stun.enabled", action="store_const", const=False,
                        default=None, help="do not serve STUN")


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {name[4:]: value for name, value in vars(args).items() if name.startswith("cfg:")}
