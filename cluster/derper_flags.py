"""derper's command line, accepted as-is: `derper -a :443 -hostname derp.example.com -certmode=manual ...`
works as the `derper` console script and inside `cluster up`.

Go's flag package rules: one or two dashes (`-a`, `--a`), `-flag=value` or `-flag value`, booleans as
`-flag`, `-flag=true`, `-flag=false` (never `-flag false`), parsing stops at the first non-flag or
`--`. Each derper flag maps to one setting of cluster/config.py (docs/DERPER-FLAGS.md has the table);
a bad value is one line naming the flag, exit 2.

derper's own defaults and rules apply only to the `derper` entry point (`derper_mode=True`): `-a :443`,
`-http-port 80`, `-certmode letsencrypt`, `-hostname derp.tailscale.com`, TLS only on port 443 or with
`-certmode manual`, `-c` required unless root (then /var/lib/derper/derper.key). In `cluster up` the
flags just set the same settings over our own defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SETTINGS_BY_KEY, ConfigError, _duration, parse_hostport


@dataclass(frozen=True)
class DerperFlag:
    name: str
    key: str | None  # our setting; None: handled specially
    boolean: bool = False
    note: str = ""


# derper.go's flag set (tailscale v1.102.5), in its order.
DERPER_FLAGS: tuple[DerperFlag, ...] = (
    DerperFlag("dev", None, True, "listen on :3340, plain HTTP unless -certmode manual"),
    DerperFlag("version", None, True, "print the version and exit"),
    DerperFlag("a", "server.listen"),
    DerperFlag("http-port", "server.http_port"),
    DerperFlag("stun-port", "stun.port"),
    DerperFlag("c", "server.key_file"),
    DerperFlag("certmode", "server.certmode"),
    DerperFlag("certdir", "server.certdir"),
    DerperFlag("hostname", "server.hostname"),
    DerperFlag("acme-eab-kid", None, note="only for -certmode gcp, which is not supported"),
    DerperFlag("acme-eab-key", None, note="only for -certmode gcp, which is not supported"),
    DerperFlag("acme-email", "server.acme_email"),
    DerperFlag("acme-ip-certs", "server.acme_ip_certs", True),
    DerperFlag("stun", "stun.enabled", True),
    DerperFlag("derp", "server.derp", True),
    DerperFlag("home", "server.home"),
    DerperFlag("mesh-psk-file", "server.mesh_key_file"),
    DerperFlag("mesh-with", "server.mesh_with"),
    DerperFlag("secrets-url", None, note="setec is not supported; use -mesh-psk-file"),
    DerperFlag("secrets-path-prefix", None, note="setec is not supported; ignored without -secrets-url"),
    DerperFlag("secrets-cache-dir", None, note="setec is not supported; ignored without -secrets-url"),
    DerperFlag("bootstrap-dns-names", "server.bootstrap_dns_names"),
    DerperFlag("unpublished-bootstrap-dns-names", "server.unpublished_bootstrap_dns_names"),
    DerperFlag("verify-clients", "admission.verify_clients", True),
    DerperFlag("verify-client-url", "admission.verify_client_url"),
    DerperFlag("verify-client-url-fail-open", "admission.verify_client_url_fail_open", True),
    DerperFlag("socket", "admission.tailscaled_socket"),
    DerperFlag("accept-connection-limit", "limits.accept_connection_limit"),
    DerperFlag("accept-connection-burst", "limits.accept_connection_burst"),
    DerperFlag("rate-config", "limits.rate_config"),
    DerperFlag("tcp-keepalive-time", "limits.tcp_keepalive_time"),
    DerperFlag("tcp-user-timeout", "limits.tcp_user_timeout"),
    DerperFlag("tcp-write-timeout", "limits.tcp_write_timeout"),
    DerperFlag("ace", None, True, "not supported (experimental in derper); only -ace=false is accepted"),
)
DERPER_FLAGS_BY_NAME = {flag.name: flag for flag in DERPER_FLAGS}

#: derper flags that take a Go duration
_DURATION_FLAGS = {"tcp-keepalive-time", "tcp-user-timeout", "tcp-write-timeout"}

#: derper flags whose name is also one of our `cluster up` flags with a different meaning: they are
#: read the derper way only with one dash (`--stun HOST:PORT` is ours, `-stun=false` is derper's).
_OURS_WITH_TWO_DASHES = {"stun"}

#: derper's defaults where they differ from ours (cmd/derper/derper.go)
DERPER_DEFAULTS: dict[str, Any] = {
    "server.listen": ":443",
    "server.http_port": "80",
    "server.certmode": "letsencrypt",
    "server.hostname": "derp.tailscale.com",
    "server.certdir": str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                          / "tailscale" / "derper-certs"),
    "stun.port": "3478",
}

#: DERP_* variables of the common derper images that are not one of our settings' variables
COMPAT_ENV = {
    "DERP_DEV_MODE": "-dev (fredliang44/derper-docker's first images)",
}


@dataclass
class Parsed:
    flags: dict[str, Any] = field(default_factory=dict)  # setting key -> raw value
    named: dict[str, str] = field(default_factory=dict)  # setting key -> the flag as given, for errors
    rest: list[str] = field(default_factory=list)  # arguments that are not derper flags
    dev: bool = False
    version: bool = False
    warnings: list[str] = field(default_factory=list)


def _go_bool(flag: str, text: str) -> bool:
    # strconv.ParseBool
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ConfigError(f"{flag}: invalid boolean value {text!r}; use {flag}=true or {flag}=false")


def split_derper_args(argv: list[str], *, derper_mode: bool) -> Parsed:
    """Take derper's flags out of argv (the rest is left for argparse, in order)."""
    out = Parsed()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.rest += argv[i:]
            break
        if not arg.startswith("-") or arg == "-":
            if derper_mode:  # Go's flag package stops at the first non-flag argument
                raise ConfigError(f"{arg!r}: derper takes no positional arguments (a boolean is "
                                  "-flag=false, not -flag false)")
            out.rest.append(arg)
            i += 1
            continue
        dashes = 2 if arg.startswith("--") else 1
        name, eq, value = arg[dashes:].partition("=")
        flag = DERPER_FLAGS_BY_NAME.get(name)
        if flag is None or (not derper_mode and dashes == 2 and name in _OURS_WITH_TWO_DASHES):
            if derper_mode and name not in ("h", "help"):
                raise ConfigError(f"{arg}: flag provided but not defined (derper's flags: "
                                  "docs/DERPER-FLAGS.md)")
            out.rest.append(arg)
            i += 1
            continue
        shown = "-" * dashes + name  # errors name the flag as it was typed
        if flag.boolean:
            on = _go_bool(shown, value) if eq else True
        else:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{shown}: flag needs an argument")
                i += 1
                value = argv[i]
        i += 1
        if flag.name == "dev":
            out.dev = on
        elif flag.name == "version":
            out.version = on
        elif flag.name == "ace":
            if on:
                raise ConfigError("-ace: derper's experimental ACE (CONNECT) server is not supported; drop -ace")
        elif flag.name == "secrets-url":
            if value:
                raise ConfigError("-secrets-url: setec is not supported; put the mesh key in a file "
                                  "and pass -mesh-psk-file FILE")
        elif flag.name in ("secrets-path-prefix", "secrets-cache-dir", "acme-eab-kid", "acme-eab-key"):
            out.warnings.append(f"{shown} ignored: {flag.note}")
        elif flag.key is not None:
            if flag.name in _DURATION_FLAGS:  # Go durations (2s, 10m) as seconds, for any converter
                try:
                    value = repr(_duration(value))
                except ValueError as exc:
                    raise ConfigError(f"{shown} ({flag.key}): {exc}") from exc
            out.flags[flag.key] = on if flag.boolean else value
            out.named[flag.key] = shown
    return out


def derper_settings(parsed: Parsed, env: Mapping[str, str], *, derper_mode: bool) -> dict[str, Any]:
    """The settings the derper flags ask for, with derper's defaults and rules in derper mode."""
    flags = dict(parsed.flags)
    dev = parsed.dev or _env_dev(env)
    if derper_mode:
        for key, value in DERPER_DEFAULTS.items():
            env_name = SETTINGS_BY_KEY[key].env
            if key not in flags and not (env_name and env.get(env_name)):
                flags[key] = value
        if "server.key_file" not in flags and not env.get("DERP_KEY_FILE"):
            if os.geteuid() != 0:
                raise ConfigError("-c: derper needs -c <config path> (the server key file, created if "
                                  "missing) unless run as root")
            flags["server.key_file"] = "/var/lib/derper/derper.key"
        if "server.state_dir" not in flags and not env.get("DERP_STATE_DIR"):
            flags["server.state_dir"] = str(Path(flags["server.key_file"]).resolve().parent)
        if "server.mesh_key_file" not in flags and not env.get("DERP_MESH_KEY_FILE"):
            for candidate in ("/home/derp/keys/derp-mesh.key", str(Path.home() / "keys" / "derp-mesh.key")):
                if Path(candidate).exists():
                    flags["server.mesh_key_file"] = candidate
                    break
    if dev:
        flags["server.listen"] = ":3340"  # derper: -dev overrides -a
    if derper_mode or dev:
        # derper serves TLS only on port 443 or with -certmode manual; anything else is plain HTTP.
        listen = str(flags.get("server.listen") or env.get("DERP_ADDR") or ":443")
        mode = str(flags.get("server.certmode") or env.get("DERP_CERT_MODE") or "letsencrypt").lower()
        try:
            port = parse_hostport(listen, default_host="")[1]
        except ValueError as exc:
            raise ConfigError(f"{parsed.named.get('server.listen', '-a')} (server.listen): invalid server "
                              f"address {listen!r}: {exc}; want :PORT, IP:PORT or [IPv6]:PORT") from exc
        if mode == "gcp":
            raise ConfigError("-certmode: gcp (Google Trust Services) is not supported; use letsencrypt or manual")
        if port != 443 and mode != "manual":
            flags["server.certmode"] = "dev"
        # derper binds STUN to the -a host and -stun-port
        host = parse_hostport(listen, default_host="")[0]
        if host and "stun.listen" not in flags:
            flags["stun.listen"] = f"[{host}]:3478" if ":" in host else f"{host}:3478"
    return flags


def _env_dev(env: Mapping[str, str]) -> bool:
    raw = env.get("DERP_DEV_MODE", "")
    if not raw:
        return False
    try:
        return _go_bool("DERP_DEV_MODE", raw)
    except ConfigError as exc:
        raise ConfigError(f"DERP_DEV_MODE: {raw!r} is not true/false") from exc


def unknown_derp_env(env: Mapping[str, str]) -> list[str]:
    """DERP_* variables that are neither a setting's variable nor a known image variable."""
    known = {setting.env for setting in SETTINGS_BY_KEY.values() if setting.env} | set(COMPAT_ENV)
    return sorted(name for name in env if name.startswith("DERP_") and name not in known)
