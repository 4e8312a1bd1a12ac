"""`cluster probe`: arguments, targets, exit status (0 passed, 1 a check failed, 2 usage)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from relay_worker.handshake import is_hex32

from .model import DEFAULT_STUN_PORT, DEFAULT_TIMEOUT, ProbeOptions, ProbeUsageError, Target
from .output import render_table, report_json
from .run import probe_all
from .targets import load_derpmap, target_from_url, targets_from_derpmap


def _targets_from_args(args: argparse.Namespace) -> list[Target]:
    stun_port = -1 if args.no_stun else DEFAULT_STUN_PORT if args.stun_port is None else args.stun_port
    if args.urls and args.derpmap:
        raise ProbeUsageError("give URLs or --derpmap, not both")
    if args.urls:
        return [target_from_url(url, stun_port=stun_port, insecure=args.insecure, cert_name=args.cert_name)
                for url in args.urls]
    if args.derpmap:
        targets = targets_from_derpmap(load_derpmap(args.derpmap), plain_http=args.plain_http,
                                       insecure=args.insecure)
    else:
        # Nothing named: probe what this node's own config publishes (`cluster derpmap`).
        from cluster.config import load_config
        from cluster.derpmap import build_derpmap

        config = load_config(args.config, os.environ, {})
        plain = args.plain_http or (not config.tls and not config.regions)
        targets = targets_from_derpmap(build_derpmap(config), plain_http=plain, insecure=args.insecure)
    if args.no_stun or args.stun_port is not None:
        for target in targets:  # an explicit flag beats the map's STUNPort
            target.stun_port = stun_port
    return targets


def read_mesh_key_file(path: str) -> str:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ProbeUsageError(f"--mesh-psk-file: cannot read {path}: {exc.strerror}") from exc
    if not is_hex32(text):
        raise ProbeUsageError(f"--mesh-psk-file: {path} must hold 64 hex characters (derper's mesh key)")
    return text.lower()


def _mesh_key_from_args(args: argparse.Namespace) -> str:
    """--mesh-psk-file (derpprobe's flag), else TAILSCALE_DERPER_MESH_KEY (derpprobe -dev), else the
    mesh key file of --config when probing this node's own derpMap."""
    if args.mesh_psk_file:
        return read_mesh_key_file(args.mesh_psk_file)
    env = os.environ.get("TAILSCALE_DERPER_MESH_KEY", "").strip()
    if env:
        if not is_hex32(env):
            raise ProbeUsageError("TAILSCALE_DERPER_MESH_KEY: want 64 hex characters")
        return env.lower()
    if not args.urls and not args.derpmap:
        from cluster.config import ConfigError, load_config

        try:
            path = load_config(args.config, os.environ, {}).values["server.mesh_key_file"]
        except ConfigError:
            return ""
        return read_mesh_key_file(path) if path else ""
    return ""


def cmd_probe(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        print("cluster probe: --timeout must be > 0", file=sys.stderr)
        return 2
    try:
        targets = _targets_from_args(args)
    except ProbeUsageError as exc:
        print(f"cluster probe: {exc}", file=sys.stderr)
        return 2
    if not targets:
        print("cluster probe: no nodes to probe", file=sys.stderr)
        return 2
    try:
        mesh_key = _mesh_key_from_args(args)
    except ProbeUsageError as exc:
        print(f"cluster probe: {exc}", file=sys.stderr)
        return 2
    options = ProbeOptions(timeout=args.timeout, ca_file=args.ca_file, mesh_key=mesh_key)
    nodes, meshes = asyncio.run(probe_all(targets, options, mesh=not args.no_mesh))
    doc = report_json(nodes, meshes)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        render_table(nodes, meshes)
    return 0 if doc["ok"] else 1


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "probe", help="check STUN, TLS, /derp/probe and a real DERP relay round trip for each node",
        description="Probe DERP nodes end to end. Without URLs or --derpmap, probes the derpMap of --config "
                    "(this node alone by default). Exit status: 0 all passed, 1 a check failed, 2 usage.")
    parser.add_argument("urls", nargs="*", metavar="URL",
                        help="DERP URLs like https://derp.example.com/derp or http://127.0.0.1:3340/derp")
    parser.add_argument("--derpmap", metavar="FILE",
                        help="derpMap JSON (`cluster derpmap` output or a policy file) or headscale YAML")
    parser.add_argument("--config", help="TOML config whose derpMap to probe when no URL/--derpmap is given")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"seconds each check may take (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify TLS certificates (still reported), like InsecureForTests")
    parser.add_argument("--ca-file", metavar="PEM", help="extra CA bundle to trust (private CAs, tests)")
    parser.add_argument("--stun-port", type=int, default=None, metavar="PORT",
                        help=f"STUN port (default: {DEFAULT_STUN_PORT} for URLs, the node's STUNPort for a "
                             "derpMap; -1 = skip STUN)")
    parser.add_argument("--no-stun", action="store_true", help="skip the STUN check")
    parser.add_argument("--cert-name", default="", metavar="NAME",
                        help="for URL targets: expected certificate name or sha256-raw:<hex> pin")
    parser.add_argument("--plain-http", action="store_true",
                        help="dial derpMap nodes over plain HTTP (dev mode; what TS_DEBUG_USE_DERP_HTTP=1 does)")
    parser.add_argument("--no-mesh", action="store_true", help="skip the cross-node delivery checks")
    parser.add_argument("--mesh-psk-file", "--mesh-key-file", "-mesh-psk-file", dest="mesh_psk_file", metavar="FILE",
                        help="derper's mesh key (64 hex), as derpprobe: lets the probe's keys through nodes "
                             "that verify clients (also TAILSCALE_DERPER_MESH_KEY)")
    parser.set_defaults(func=cmd_probe)
