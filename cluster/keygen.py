"""`cluster keygen --out FILE`: write a new cluster mesh secret (0600)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mesh.curve import derive_curve_keys, generate_secret_file, read_secret_file


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.out)
    if path.exists():
        print(f"cluster keygen: {path} exists; refusing to overwrite a cluster secret (remove it first)")
        return 1
    generate_secret_file(path)
    keys = derive_curve_keys(read_secret_file(path))
    print(f"wrote cluster mesh secret to {path} (mode 0600); CURVE public key {keys.public.decode()}")
    print("give every node the same file: cluster up --mesh-secret-file " + str(path))
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("keygen", help="create a cluster mesh secret for --mesh-secret-file")
    parser.add_argument("--out", required=True, help="file to create (mode 0600)")
    parser.set_defaults(func=cmd_keygen)
