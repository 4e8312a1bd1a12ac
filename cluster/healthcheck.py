"""`python -m cluster.healthcheck`: exit 0 only if this node relays a packet, within 3 s.

Used by the Docker HEALTHCHECK and the Kubernetes readiness probe. An open port says little (a
worker can accept TCP and still fail the handshake or lose packets), so this connects two
throwaway DERP clients to the local DERP port, sends one packet from the first to the second and
waits for it to arrive. The clients say IsProber so dashboards can tell them from real nodes.

It reads the same settings as `cluster up` (TOML file via --config, DERP_* environment, flags),
so in a container it finds the port and cert mode from the variables the node runs with.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import ssl
import sys

from relay_worker.client import DerpClient, DerpClientError

from .config import Config, ConfigError, load_config

RESEND_INTERVAL = 0.1


def local_url(config: Config) -> str:
    """The DERP URL of this node on loopback: the configured port, on 127.0.0.1 (or ::1)."""
    host, port = config.listen_addr
    if ":" in host:  # an IPv6 listen address; "::" also accepts v4 unless v6only, but be exact
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
                           server_hostname: str | None = None, timeout: float = 3.0) -> None:
    """Connect two clients, relay one packet A -> B; raise on any failure or after timeout."""
    async with asyncio.timeout(timeout):
        a = await DerpClient.connect(url, is_prober=True, ssl_context=ssl_context,
                                     server_hostname=server_hostname, timeout=timeout)
        try:
            b = await DerpClient.connect(url, is_prober=True, ssl_context=ssl_context,
                                         server_hostname=server_hostname, timeout=timeout)
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


async def _resend(sender: DerpClient, dst: bytes, payload: bytes) -> None:
    # A first packet can legitimately be dropped: B's key may not be registered the instant its
    # handshake returns, and with several workers the owner of B may not be known to A's worker
    # yet. A real client retries too, so the check does; only "never arrives" is unhealthy.
    while True:
        await sender.send(dst, payload)
        await asyncio.sleep(RESEND_INTERVAL)


def check(config: Config, timeout: float = 3.0) -> str | None:
    """None when healthy, else a one-line reason."""
    url = local_url(config)
    ctx = loopback_tls_context() if config.tls else None
    # SNI with the real hostname, so a node serving several names picks the one clients get.
    sni = (config.hostname or None) if config.tls else None
    try:
        asyncio.run(relay_round_trip(url, ssl_context=ctx, server_hostname=sni, timeout=timeout))
    except TimeoutError:
        return f"{url}: no relayed packet within {timeout:g}s"
    except (DerpClientError, OSError, ssl.SSLError) as exc:
        return f"{url}: {exc}"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.healthcheck",
                                     description="exit 0 if the local DERP port relays a packet")
    parser.add_argument("--config", help="the TOML file `cluster up` runs with")
    parser.add_argument("--listen", help="DERP address HOST:PORT (default: from config/DERP_ADDR)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check")
    parser.add_argument("--quiet", action="store_true", help="print nothing when healthy")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, os.environ, {"server.listen": args.listen})
    except ConfigError as exc:
        print(f"unhealthy: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    problem = check(config, args.timeout)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        sys.exit(1)
    if not args.quiet:
        print(f"healthy: {local_url(config)} relayed a packet")
    sys.exit(0)


if __name__ == "__main__":
    main()
