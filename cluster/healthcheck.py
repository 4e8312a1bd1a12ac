"""`python -m cluster.healthcheck`: exit 0 if this node relays a packet, within 3 s.

Used by the Docker HEALTHCHECK and the Kubernetes readiness probe. An open port says little (a
worker can accept TCP and still fail the handshake or lose packets), so this connects two
throwaway DERP clients to the local DERP port, sends one packet from the first to the second and
waits for it to arrive. The clients say IsProber so dashboards can tell them from real nodes.

It reads the same settings as `cluster up` (TOML file via --config, DERP_* environment, flags),
so in a container it finds the port and cert mode from the variables the node runs with.

With admission on (verify_clients, a verify URL or an allow-keys file) throwaway keys are refused,
as they should be; the check then presents derper's mesh key (server.mesh_key_file) to pass
admission like a mesh peer, or, without one, only checks that the DERP handshake is answered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import ssl
import sys
from pathlib import Path
from typing import Any

from relay_worker.client import DerpClient, DerpClientError

from .config import Config, ConfigError, load_config

RESEND_INTERVAL = 0.1


def local_url(config: Config) -> str:
    """The DERP URL of this node on loopback: the configured port, on 127.0.0.1 (or ::1)."""
    host, port = config.listen_addr
    if str(config.values["server.listen"]).strip().startswith(":"):
        local = "127.0.0.1"  # `:PORT` is both families (derper's `:443`): v4 loopback always exists
    elif ":" in host:  # an IPv6 listen address; "::" also accepts v4 unless v6only, but be exact
        local = "[::1]" if host in ("::", "::1") else f"[{host}]"
    else:
        local = "127.0.0.1" if host in ("0.0.0.0", "", "127.0.0.1") else host
    scheme = "https" if config.tls else "http"
    return f"{scheme}://{local}:{port}/derp"


def loopback_tls_context() -> ssl.SSLContext:
    # The check dials its own node over loopback to ask "does it relay?", not "is the cert
    # trusted?": the name (127.0.0.1) never matches the cert, and a selfsigned cert has no CA.
    # Cert problems fail at start (check_tls_config) and are the prober's business from outside.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def relay_round_trip(url: str, *, ssl_context: ssl.SSLContext | None = None,
                           server_hostname: str | None = None, mesh_key: str = "", timeout: float = 3.0) -> None:
    """Connect two clients, relay one packet A -> B; raise on any failure or after timeout."""
    kwargs: dict[str, Any] = {"is_prober": True, "ssl_context": ssl_context, "server_hostname": server_hostname,
                              "mesh_key": mesh_key, "timeout": timeout}
    async with asyncio.timeout(timeout):
        a = await DerpClient.connect(url, **kwargs)
        try:
            b = await DerpClient.connect(url, **kwargs)
            try:
                payload = b"healthcheck " + secrets.token_bytes(16)
                resender = asyncio.create_task(_resend(a, b.public_key, payload))
                try:
                    while True:
                        got = await b.recv_packet()
                        if got.src == a.public_key and got.data == payload:
                            return
                finally:
                    resender.cancel()
            finally:
                await b.close()
        finally:
            await a.close()


async def handshake_answers(url: str, *, ssl_context: ssl.SSLContext | None = None,
                            server_hostname: str | None = None, timeout: float = 3.0) -> None:
    """The weaker check: the DERP port upgrades, sends its ServerKey and takes our ClientInfo."""
    async with asyncio.timeout(timeout):
        client = await DerpClient.connect(url, is_prober=True, ssl_context=ssl_context,
                                          server_hostname=server_hostname, timeout=timeout, wait_server_info=False)
        await client.close()


def admission_on(config: Config) -> bool:
    v = config.values
    return bool(v["admission.verify_clients"] or v["admission.verify_client_url"] or v["admission.allow_keys_file"])


def read_mesh_key(config: Config) -> str:
    """derper's mesh key, if the node has one: mesh peers skip admission, so with it the check can
    relay even when only tailnet nodes are admitted."""
    path = config.values["server.mesh_key_file"]
    if not path:
        return ""
    try:
        key = Path(path).read_text().strip().lower()
    except OSError:
        return ""
    return key if len(key) == 64 and all(c in "0123456789abcdef" for c in key) else ""


async def _resend(sender: DerpClient, dst: bytes, payload: bytes) -> None:
    # A first packet can legitimately be dropped: B's key may not be registered the instant its
    # handshake returns, and with several workers the owner of B may not be known to A's worker
    # yet. A real client retries too, so the check does; only "never arrives" is unhealthy.
    while True:
        await sender.send(dst, payload)
        await asyncio.sleep(RESEND_INTERVAL)


def check(config: Config, timeout: float = 3.0) -> tuple[bool, str]:
    """(healthy, what was checked or what failed), one line."""
    url = local_url(config)
    ctx = loopback_tls_context() if config.tls else None
    # SNI with the real hostname, so a node serving several names picks the one clients get.
    sni = (config.hostname or None) if config.tls else None
    mesh_key = read_mesh_key(config)
    # With admission on, throwaway keys are (rightly) refused unless they present the mesh key;
    # then all that can be checked from here is that the DERP port answers the handshake.
    full = bool(mesh_key) or not admission_on(config)
    try:
        if full:
            asyncio.run(relay_round_trip(url, ssl_context=ctx, server_hostname=sni, mesh_key=mesh_key,
                                         timeout=timeout))
        else:
            asyncio.run(handshake_answers(url, ssl_context=ctx, server_hostname=sni, timeout=timeout))
    except TimeoutError:
        return False, f"{url}: no {'relayed packet' if full else 'DERP handshake'} within {timeout:g}s"
    except (DerpClientError, OSError, ssl.SSLError) as exc:
        return False, f"{url}: {exc}"
    if full:
        return True, f"{url} relayed a packet"
    return True, (f"{url} answered the DERP handshake (admission is on and there is no mesh key to pass it, "
                  "so no packet was relayed; set server.mesh_key_file for the full check)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.healthcheck",
                                     description="exit 0 if the local DERP port relays a packet")
    parser.add_argument("--config", help="the TOML file `cluster up` runs with")
    parser.add_argument("--listen", help="DERP address HOST:PORT (default: from config/DERP_ADDR)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check")
    parser.add_argument("--quiet", action="store_true", help="print nothing when a packet was relayed")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, os.environ, {"server.listen": args.listen})
    except ConfigError as exc:
        print(f"unhealthy: config error: {exc}", file=sys.stderr)
        sys.exit(1)  # Docker reserves exit status 2 in health checks
    healthy, what = check(config, args.timeout)
    if not healthy:
        print(f"unhealthy: {what}", file=sys.stderr)
        sys.exit(1)
    # --quiet hides the plain "relayed a packet"; the caveat of the weaker check is always shown
    if not args.quiet or not what.endswith("relayed a packet"):
        print(f"healthy: {what}")
    sys.exit(0)


if __name__ == "__main__":
    main()
