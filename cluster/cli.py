"""The `cluster` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from .config import ConfigError, add_setting_flags, flags_from_args, load_config


def _config_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    flags = flags_from_args(args)
    derper = getattr(args, "derper_settings", None) or {}
    names = dict(getattr(args, "derper_names", None) or {})
    for key, value in derper.items():
        if flags.get(key) is None:
            flags[key] = value
        else:
            names.pop(key, None)  # our --flag given too: it wins, and errors name it
    return load_config(getattr(args, "config", None), os.environ, flags, flag_names=names)


def _warn(line: str) -> None:
    print(f"cluster: warning: {line}", file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    import logging

    from .derper_flags import unknown_derp_env
    from .exposure import open_relay_warning
    from .supervisor import Supervisor

    for line in getattr(args, "derper_warnings", None) or []:
        _warn(line)
    for name in unknown_derp_env(os.environ):
        _warn(f"{name} is not a variable this relay reads; ignored (docs/DERPER-FLAGS.md lists them)")
    config = _config_from(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s supervisor %(levelname)s: %(message)s")
    supervisor = Supervisor(config)
    supervisor.prepare()
    open_relay = open_relay_warning(config.values, config.listen_addr[0])
    if open_relay:  # after preflight: a node that will not start is not warned about
        _warn(open_relay)
    return supervisor.run()


def cmd_derpmap(args: argparse.Namespace) -> int:
    from .derpmap import build_derpmap, headscale_yaml, to_headscale

    config = _config_from(args)
    if args.running:
        from .derpmap import running_derpmap
        from .status import fetch_unix

        sock = config.run_path / "worker-0.sock"
        try:
            varz = json.loads(fetch_unix(sock, "/debug/varz"))
        except (OSError, ValueError) as exc:
            print(f"cluster derpmap: --running: no running cluster answers at {sock} ({exc}); start it or pass "
                  "its --run-dir / --state-dir", file=sys.stderr)
            return 1
        doc = running_derpmap(varz, omit_default_regions=args.omit_default_regions)
    else:
        doc = build_derpmap(config, omit_default_regions=args.omit_default_regions)
    if args.format == "headscale":
        hs = to_headscale(doc)
        print(json.dumps(hs, indent=2) if args.json else headscale_yaml(hs), end="" if not args.json else "\n")
    else:
        print(json.dumps(doc, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import run_status

    return run_status(_config_from(args), as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cluster", description="A DERP relay cluster for Tailscale clients")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run this node's workers (the supervisor)")
    up.add_argument("--config", help="TOML config file")
    add_setting_flags(up)
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="workers, clients, packets and drops of a running node")
    status.add_argument("--config")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add_setting_flags(status)
    status.set_defaults(func=cmd_status)

    derpmap = sub.add_parser("derpmap", help="print the derpMap for the configured regions")
    derpmap.add_argument("--config")
    derpmap.add_argument("--format", choices=["tailscale", "headscale"], default="tailscale")
    derpmap.add_argument("--json", action="store_true", help="headscale format as JSON instead of YAML")
    derpmap.add_argument("--omit-default-regions", action=argparse.BooleanOptionalAction, default=True)
    derpmap.add_argument("--running", action="store_true",
                         help="the map of the running cluster: every node its mesh knows, as each publishes itself")
    add_setting_flags(derpmap)
    derpmap.set_defaults(func=cmd_derpmap)

    for module in SUBCOMMAND_MODULES:
        # No fallback: a subcommand whose module does not import is a broken install or a bug, and
        # must fail with its traceback, not vanish from the command line.
        importlib.import_module(module).add_subcommand(sub)
    return parser


#: subcommands that live in modules of their own; each module's add_subcommand adds its parser
SUBCOMMAND_MODULES = ("derptools.probe", "derptools.bench", "cluster.keygen")


def _split_derper(argv: list[str], *, derper_mode: bool) -> tuple[list[str], dict[str, object]]:
    """derper's flags out of argv; returns the rest and the namespace fields that carry them."""
    from .derper_flags import derper_settings, split_derper_args

    parsed = split_derper_args(argv, derper_mode=derper_mode)
    settings = derper_settings(parsed, os.environ, derper_mode=derper_mode)
    extra: dict[str, object] = {"derper_settings": settings, "derper_names": parsed.named,
                                "derper_warnings": parsed.warnings, "derper_version": parsed.version}
    return parsed.rest, extra


def main(argv: list[str] | None = None, *, derper_mode: bool = False) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        extra: dict[str, object] = {}
        if derper_mode:
            rest, extra = _split_derper(argv, derper_mode=True)
            if extra["derper_version"]:
                from importlib.metadata import version

                print(f"derp-cluster {version('derp-cluster')} (derper-compatible command line)")
                sys.exit(0)
            argv = ["up", *rest]
        elif argv and argv[0] in ("up", "derpmap", "status"):
            rest, extra = _split_derper(argv[1:], derper_mode=False)
            argv = [argv[0], *rest]
        args = parser.parse_args(argv)
        for name, value in extra.items():
            setattr(args, name, value)
        code = args.func(args)
    except ConfigError as exc:
        print(f"cluster: config error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def derper_main() -> None:
    """The `derper` console script: derper's command line, flags and defaults, as a drop-in."""
    main(derper_mode=True)


if __name__ == "__main__":
    main()
