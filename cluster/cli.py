"""The `cluster` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from .config import ConfigError, add_setting_flags, flags_from_args, load_config


def _config_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    return load_config(getattr(args, "config", None), os.environ, flags_from_args(args))


def cmd_up(args: argparse.Namespace) -> int:
    import logging

    from .supervisor import Supervisor

    config = _config_from(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s supervisor %(levelname)s: %(message)s")
    supervisor = Supervisor(config)
    supervisor.prepare()
    return supervisor.run()


def cmd_derpmap(args: argparse.Namespace) -> int:
    from .derpmap import build_derpmap, headscale_yaml, to_headscale

    config = _config_from(args)
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
    add_setting_flags(derpmap)
    derpmap.set_defaults(func=cmd_derpmap)

    for _name, loader in _EXTRA_COMMANDS:
        loader(sub)
    return parser


#: subcommands contributed by other modules: (name, function that adds the subparser)
_EXTRA_COMMANDS: list[tuple[str, Callable[[argparse._SubParsersAction], None]]] = []  # type: ignore[type-arg]


def _register_optional_commands() -> None:
    import importlib

    for module in ("cluster.probe", "cluster.bench", "cluster.keygen"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        add = getattr(mod, "add_subcommand", None)
        if add is not None:
            _EXTRA_COMMANDS.append((module, add))


def main(argv: list[str] | None = None) -> None:
    _register_optional_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"cluster: config error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
