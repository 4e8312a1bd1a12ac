"""Entry point of one worker process (`python -m cluster.worker_main`), started by the supervisor.

It builds the worker's Relay from the node configuration, binds the DERP port with SO_REUSEPORT,
serves its admin unix socket in the run dir, and wires in what lives outside relay_worker
(mesh forwarding, STUN, admission).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mesh.directory import Owner
from mesh.worker_mesh import WorkerMesh
from relay_worker import loop
from relay_worker.http_app import build_app
from relay_worker.keys import load_or_create_server_key
from relay_worker.relay import Relay
from relay_worker.server import WorkerServer, make_listen_socket, make_unix_socket, serve, uvicorn_config

from .config import Config, load_config
from .node_metrics import gather_worker_docs, node_metrics_text

log = logging.getLogger("cluster.worker")


def read_mesh_key(path: str) -> str:
    if not path:
        return ""
    key = Path(path).read_text().strip()
    if len(key) != 64 or any(c not in "0123456789abcdefABCDEF" for c in key):
        raise SystemExit(f"mesh key file {path}: want 64 hex characters (derper's -mesh-psk-file format)")
    return key.lower()


async def worker_main(config: Config, index: int, incarnation: int) -> None:
    run_dir = config.run_path
    server_key = load_or_create_server_key(config.state_path / "derp.key")
    relay = Relay(
        server_key,
        mesh_key=read_mesh_key(config.mesh_key_file),
        handshake_timeout=config.limits_handshake_timeout,
        token_bucket_rate=config.limits_bytes_per_second,
        token_bucket_burst=config.limits_bytes_burst or config.limits_bytes_per_second,
        max_clients=config.limits_max_clients,
    )
    host, port = config.listen_addr
    sockets = [make_listen_socket(host, port), make_unix_socket(str(run_dir / f"worker-{index}.sock"))]
    mesh = WorkerMesh(relay, Owner(config.node_name, index), incarnation,
                      [f"ipc://{run_dir}/mesh-{index}.ipc"], dead_after=3.0)
    for peer in range(config.worker_count):
        mesh.add_peer(Owner(config.node_name, peer), f"ipc://{run_dir}/mesh-{peer}.ipc")
    mesh.start()

    async def node_stats() -> dict[str, Any]:
        return {"index": index, "pid": os.getpid(), "incarnation": incarnation, **mesh.stats()}

    async def metrics_text() -> str:
        own = {"worker": relay.stats.snapshot(), **await node_stats()}
        docs = await gather_worker_docs(run_dir, config.worker_count, index, own)
        try:
            supervisor = json.loads((run_dir / "supervisor.json").read_text())
        except (OSError, ValueError):
            supervisor = None
        return node_metrics_text(docs, supervisor)

    app = build_app(relay, admin_token=config.admin_token_value(), node_stats=node_stats,
                    metrics_text=metrics_text)
    server = WorkerServer(uvicorn_config(app, relay, log_level=config.log_level), relay)
    log.info("worker %d (pid %d, incarnation %d) serving on %s:%d", index, os.getpid(), incarnation, host, port)
    try:
        await serve(server, sockets)
    finally:
        mesh.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cluster-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--incarnation", type=int, default=0)
    parser.add_argument("--settings", required=True, help="JSON object of effective settings")
    args = parser.parse_args(argv)
    settings: dict[str, Any] = json.loads(args.settings)
    config = load_config(flags=settings)
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s worker{args.index} %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        loop.run(worker_main(config, args.index, args.incarnation))
    sys.exit(0)


if __name__ == "__main__":
    main()
