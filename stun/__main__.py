"""`python -m stun --listen HOST:PORT` runs a standalone server;
`python -m stun --bench HOST:PORT --seconds N` measures how many requests/s one server answers."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import socket
import sys
import time
from collections.abc import Sequence

from .codec import BINDING_SUCCESS, DropReason, build_binding_request, parse_binding_response
from .server import start_stun_server


def parse_hostport(text: str) -> tuple[str, int]:
    """'1.2.3.4:3478', '[::1]:3478' or '::1:3478' (last colon separates the port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    try:
        port_num = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    if not 0 <= port_num <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host, port_num


def _format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _serve(host: str, port: int, software: str | None) -> None:
    server = await start_stun_server(host, port, software=software)
    print(f"stun listening on {_format_addr(*server.address)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        # Final counters go to stderr so the one stdout line stays the only thing scripts parse.
        print(json.dumps(server.stats()), file=sys.stderr, flush=True)


def _run_server(args: argparse.Namespace) -> int:
    host, port = args.listen
    run = asyncio.run
    if args.loop in ("auto", "uvloop"):
        try:
            import uvloop  # optional speed-up: used when installed unless --loop asyncio

            run = uvloop.run
        except ImportError:
            if args.loop == "uvloop":
                print("uvloop is not installed", file=sys.stderr)
                return 2
    run(_serve(host, port, args.software))
    return 0


def bench(host: str, port: int, seconds: float, window: int) -> dict[str, float]:
    """Closed-loop load: keep `window` requests outstanding, send a new one per answer.

    A plain blocking socket rather than asyncio keeps the load generator cheap, so the figure is the
    server's rate rather than the client's. Requests presumed lost (no answer for 200 ms) are
    counted and replaced, so a drop cannot stall the loop.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    if not ipaddress.ip_address(str(sockaddr[0]).split("%")[0]).is_loopback:
        raise SystemExit("--bench only targets loopback addresses (127.0.0.0/8 or ::1)")
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.connect(sockaddr)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.settimeout(0.2)
    local_port = sock.getsockname()[1]

    seq = 0
    outstanding: set[bytes] = set()

    def send_one() -> None:
        nonlocal seq
        seq += 1
        txid = seq.to_bytes(12, "big")  # unique per send, so a late duplicate is never double counted
        outstanding.add(txid)
        sock.send(build_binding_request(txid))

    # One checked exchange first: the bench must measure a server that answers correctly.
    send_one()
    try:
        first = parse_binding_response(sock.recv(2048))
    except TimeoutError:
        raise SystemExit(f"no answer from {_format_addr(host, port)}") from None
    if isinstance(first, DropReason) or first.port != local_port:
        raise SystemExit(f"server gave a wrong answer: {first!r}")
    outstanding.clear()

    answered = lost = 0
    sent_before = seq
    for _ in range(window):
        send_one()
    start = time.perf_counter()
    end = start + seconds
    success = BINDING_SUCCESS.to_bytes(2, "big")
    now = start
    while now < end:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            lost += len(outstanding)
            outstanding.clear()
            for _ in range(window):
                send_one()
            now = time.perf_counter()
            continue
        now = time.perf_counter()
        txid = data[8:20]
        if data[:2] == success and txid in outstanding:
            outstanding.discard(txid)
            answered += 1
            send_one()
    elapsed = now - start
    sock.close()
    return {
        "seconds": round(elapsed, 3),
        "window": window,
        "sent": seq - sent_before,
        "answered": answered,
        "lost": lost,
        "requests_per_second": round(answered / elapsed, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stun", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--listen", type=parse_hostport, metavar="HOST:PORT", help="run a Binding server")
    mode.add_argument("--bench", type=parse_hostport, metavar="HOST:PORT", help="load a server on loopback")
    parser.add_argument("--seconds", type=float, default=5.0, help="bench duration (default 5)")
    parser.add_argument("--window", type=int, default=32, help="bench requests in flight (default 32)")
    parser.add_argument("--software", default=None, help="SOFTWARE attribute to send when it fits")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="server event loop")
    args = parser.parse_args(argv)
    if args.listen is not None:
        return _run_server(args)
    if args.seconds <= 0 or args.window <= 0:
        parser.error("--seconds and --window must be positive")
    result = bench(args.bench[0], args.bench[1], args.seconds, args.window)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
