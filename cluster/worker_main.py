"""Entry point of one worker process (`python -m cluster.worker_main`), started by the supervisor.

It builds the worker's Relay from the node configuration, binds the DERP port with SO_REUSEPORT,
serves its admin unix socket in the run dir, and wires in what lives outside relay_worker
(mesh forwarding, STUN, admission).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import zmq

from mesh.curve import derive_curve_keys, read_secret_file, start_authenticator
from mesh.directory import Owner
from mesh.liveness import install_stall_hook
from mesh.worker_mesh import WorkerMesh
from relay_worker import loop
from relay_worker.admission import install as install_admission
from relay_worker.bootstrap_dns import BootstrapDNS
from relay_worker.http_app import build_app
from relay_worker.keys import load_or_create_server_key
from relay_worker.metrics import derper_gauges
from relay_worker.ratelimit import (
    AcceptLimiter,
    effective_read_limit,
    load_rate_config,
    read_limit_stats,
    set_read_limit,
)
from relay_worker.relay import Relay
from relay_worker.server import WorkerServer, make_listen_socket, make_unix_socket, serve, uvicorn_config
from stun.server import start_stun_server

from .config import Config, ConfigError, parse_hostport, trusted_config
from .derpmap import published_derp_node
from .http_port import SideServers
from .node_metrics import gather_worker_docs, node_expvar, node_metrics_text, node_varz_text
from .preflight import read_mesh_key, read_rate_config
from .supervisor import PONG_SERVING, PONG_STARTING
from .tls import CertReloader, build_ssl_context

log = logging.getLogger("cluster.worker")


def answer_liveness_pings(control_fd: int, server: WorkerServer) -> None:
    """Answer every ping byte from the supervisor (cluster/supervisor.py) with whether this worker
    serves yet. The answers come from this event loop, so a wedged loop stops answering."""
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    loop = asyncio.get_running_loop()

    def answer() -> None:
        try:
            pings = control.recv(4096)
        except BlockingIOError:
            return
        except ConnectionError:
            pings = b""
        if not pings:  # the supervisor is gone; nobody to answer
            loop.remove_reader(control_fd)
            control.close()
            return
        with contextlib.suppress(BlockingIOError, ConnectionError):
            control.send(PONG_SERVING if server.started else PONG_STARTING)

    loop.add_reader(control_fd, answer)


async def worker_main(config: Config, index: int, incarnation: int, control_fd: int = -1) -> None:
    run_dir = config.run_path
    server_key = load_or_create_server_key(config.server_key_path)
    client_burst = config.limits_bytes_burst or config.limits_bytes_per_second
    relay = Relay(
        server_key,
        mesh_key=read_mesh_key(config.mesh_key_file),
        handshake_timeout=config.limits_handshake_timeout,
        write_timeout=config.limits_tcp_write_timeout,
        # derper's floor: the burst is at least one full SendPacket (65,568 bytes)
        # (--client-bytes-burst defaults to one second's worth)
        token_bucket_rate=effective_read_limit(config.limits_bytes_per_second, client_burst)[0],
        token_bucket_burst=effective_read_limit(config.limits_bytes_per_second, client_burst)[1],
        max_clients=config.limits_max_clients,
    )
    admission = install_admission(
        relay,
        verify_clients=config.admission_verify_clients,
        tailscaled_socket=config.admission_tailscaled_socket,
        verify_client_url=config.admission_verify_client_url,
        fail_open=config.admission_verify_client_url_fail_open,
        allow_keys_file=config.admission_allow_keys_file,
        cache_ttl=config.admission_cache_ttl,
        timeout=config.admission_timeout,
    )
    rate_config = config.limits_rate_config

    def apply_rate_config(rate: int, burst: int) -> None:
        set_read_limit(relay, rate, burst)
        log.info("rate config applied: client-rate=%d bytes/sec, client-burst=%d bytes", rate, burst)

    def reload_rate_config() -> None:
        try:
            apply_rate_config(*load_rate_config(rate_config))
        except ValueError as exc:
            log.warning("rate config %s not reloaded (keeping the current limits): %s", rate_config, exc)

    if rate_config:
        apply_rate_config(*read_rate_config(rate_config))  # the supervisor's preflight read it too

    def on_sighup() -> None:
        if admission is not None:
            admission.reload()
        if rate_config:
            reload_rate_config()

    # SIGHUP (forwarded by the supervisor) reloads the allow-keys file and the rate config; never
    # let it kill a worker
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    accept_gate = AcceptLimiter.from_settings(config.limits_accept_connection_limit,
                                              config.limits_accept_connection_burst,
                                              config.limits_accept_connection_limit_per_ip)
    host, port = config.listen_addr
    ssl_context = build_ssl_context(config)
    # derper's -tcp-user-timeout / -tcp-keepalive-time
    tcp = make_listen_socket(host, port, user_timeout=config.limits_tcp_user_timeout,
                             keepalive_idle=config.limits_tcp_keepalive_time)
    admin_sock = make_unix_socket(str(run_dir / f"worker-{index}.sock"))
    mesh = build_mesh(config, relay, index, incarnation)
    mesh.start()
    install_stall_hook(asyncio.get_running_loop())  # tests only: needs DERP_TEST_HOOKS=1

    stun_server = None
    stun_addr = config.stun_addr
    if stun_addr is not None:
        # Every worker answers STUN on the same port (SO_REUSEPORT): no extra process to babysit.
        try:
            stun_server = await start_stun_server(stun_addr[0], stun_addr[1], reuse_port=True)
        except OSError as exc:
            raise SystemExit(f"stun.listen (--stun): cannot bind udp {stun_addr[0]}:{stun_addr[1]}: "
                             f"{exc.strerror}; pick another port or --no-stun") from exc

    async def node_stats() -> dict[str, Any]:
        doc: dict[str, Any] = {"index": index, "pid": os.getpid(), "incarnation": incarnation, **mesh.stats()}
        if stun_server is not None:
            doc["stun"] = stun_server.stats()
        doc["admission"] = admission.stats() if admission is not None else None
        doc["accept_limit"] = accept_gate.stats() if accept_gate is not None else None
        doc["read_limit"] = {**read_limit_stats(), "rate": relay.token_bucket_rate, "burst": relay.token_bucket_burst}
        return doc

    async def node_docs() -> list[dict[str, Any]]:
        snapshot = relay.stats.snapshot()
        snapshot.update(derper_gauges(relay))
        own = {"worker": snapshot, **await node_stats()}
        return await gather_worker_docs(run_dir, config.worker_count, index, own)

    async def metrics_text() -> str:
        docs = await node_docs()
        try:
            supervisor = json.loads((run_dir / "supervisor.json").read_text())
        except (OSError, ValueError):
            supervisor = None
        return node_metrics_text(docs, supervisor)

    async def varz_text() -> str:
        return node_varz_text(await node_docs())

    async def vars_json() -> dict[str, Any]:
        return node_expvar(await node_docs())

    bootstrap = BootstrapDNS(config.bootstrap_dns_names, config.unpublished_bootstrap_dns_names)
    bootstrap.start()
    derp_enabled = bool(config.values["server.derp"])
    # -derp=false: no connection is taken over for DERP; /derp answers the app's 404
    derp_relay = relay if derp_enabled else None
    app = build_app(relay, admin_token=config.admin_token_value(), node_stats=node_stats,
                    metrics_text=metrics_text, varz_text=varz_text, vars_json=vars_json,
                    home=config.home, bootstrap_dns=bootstrap, derp_enabled=derp_enabled)
    read_timeout = config.limits_http_read_timeout
    server = WorkerServer(uvicorn_config(app, derp_relay, log_level=config.log_level, accept_gate=accept_gate,
                                         ssl_context=ssl_context, read_timeout=read_timeout), relay)
    # uvicorn puts TLS on every socket one server serves: with TLS, the admin unix socket (and the
    # plain-HTTP /generate_204 port) get a plain side server of their own.
    side = await SideServers.start(config, uvicorn_config(app, derp_relay, log_level=config.log_level,
                                                          read_timeout=read_timeout),
                                   admin_sock if ssl_context else None)
    if control_fd >= 0:
        answer_liveness_pings(control_fd, server)
    reloader = CertReloader.for_config(ssl_context, config)
    log.info("worker %d (pid %d, incarnation %d) serving on %s:%d", index, os.getpid(), incarnation, host, port)
    try:
        await serve(server, [tcp] if ssl_context else [tcp, admin_sock])
    finally:
        if reloader is not None:
            await reloader.stop()
        await side.stop()
        await bootstrap.stop()
        await mesh.close()
        if stun_server is not None:
            stun_server.close()


def build_mesh(config: Config, relay: Relay, index: int, incarnation: int) -> WorkerMesh:
    """This worker's membership in the node and, with --mesh-listen, in the multi-node cluster."""
    run_dir = config.run_path
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    curve = None
    if config.node_mesh_secret_file:
        curve = derive_curve_keys(read_secret_file(Path(config.node_mesh_secret_file)))
        start_authenticator(context, curve)
    inbox = [f"ipc://{run_dir}/mesh-{index}.ipc"]
    advertise = ""
    mesh_addr = config.mesh_addr
    if mesh_addr is not None:
        host, port = mesh_addr
        bind_host = f"[{host}]" if ":" in host else host
        inbox.append(f"tcp://{bind_host}:{port + index}")
        adv = config.mesh_advertise_host()
        advertise = f"tcp://{f'[{adv}]' if ':' in adv else adv}:{port + index}"
    mesh = WorkerMesh(relay, Owner(config.node_name, index), incarnation, inbox,
                      region=config.node_region_id, advertise_tcp=advertise, dead_after=3.0,
                      node_dead_after=config.node_dead_after, curve=curve, context=context,
                      horizon=config.node_tombstone_horizon, busy_grace=config.node_busy_grace)
    for peer in range(config.worker_count):
        ipc = f"ipc://{run_dir}/mesh-{peer}.ipc"
        mesh.add_peer(Owner(config.node_name, peer), ipc, ipc=ipc, region=config.node_region_id)
    for url in config.mesh_with:  # the supervisor's preflight made sure there is a mesh key
        mesh.mesh_with_derper(url, relay.mesh_key)
    for seed in config.node_join:
        host, port = parse_hostport(seed)
        mesh.add_seed(f"tcp://{f'[{host}]' if ':' in host else host}:{port}")
    mesh.derp_node = published_derp_node(config)  # in heartbeats, for `cluster derpmap --running`
    return mesh


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cluster-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--incarnation", type=int, default=0)
    parser.add_argument("--control-fd", type=int, default=-1, help="the supervisor's liveness socket")
    parser.add_argument("--settings", required=True, help="JSON object of the supervisor's validated settings")
    args = parser.parse_args(argv)
    try:
        config = trusted_config(json.loads(args.settings))
        logging.basicConfig(level=config.log_level.upper(),
                            format=f"%(asctime)s worker{args.index} %(levelname)s %(name)s: %(message)s")
        with contextlib.suppress(KeyboardInterrupt):
            loop.run(worker_main(config, args.index, args.incarnation, args.control_fd))
    except ConfigError as exc:  # a file changed since the supervisor's preflight read it
        raise SystemExit(f"worker {args.index}: config error: {exc}") from exc
    sys.exit(0)


if __name__ == "__main__":
    main()
