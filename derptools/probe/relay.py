"""The DERP checks: a packet relayed through one node, and across two nodes of a region (the mesh)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import struct
import time
from typing import TYPE_CHECKING, Any

from .certs import client_ssl_context
from .errors import describe_connect_error
from .model import RESEND_INTERVAL, Check, MeshReport, ProbeOptions, Target

if TYPE_CHECKING:
    from relay_worker.client import DerpClient


def _connect_kwargs(target: Target, options: ProbeOptions) -> dict[str, Any]:
    return {"is_prober": True, "timeout": options.timeout, "ssl_context": client_ssl_context(target, options.ca_file),
            "server_hostname": target.host_name, "mesh_key": options.mesh_key}


async def _close_client(client: DerpClient) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 1.0)


async def _connect_pair(src: Target, dst: Target, options: ProbeOptions) -> tuple[DerpClient, DerpClient]:
    """Receiver on dst, sender on src, connected concurrently. Raises (target, exception) on failure."""
    from relay_worker.client import DerpClient

    results = await asyncio.gather(DerpClient.connect(dst.url, **_connect_kwargs(dst, options)),
                                   DerpClient.connect(src.url, **_connect_kwargs(src, options)),
                                   return_exceptions=True)
    clients = [r for r in results if not isinstance(r, BaseException)]
    for target, result in ((dst, results[0]), (src, results[1])):
        if isinstance(result, BaseException):
            for client in clients:
                await _close_client(client)  # type: ignore[arg-type]
            if not isinstance(result, Exception):
                raise result
            raise _PairConnectError(target, result)
    return results[1], results[0]  # type: ignore[return-value]


class _PairConnectError(Exception):
    def __init__(self, target: Target, error: Exception) -> None:
        super().__init__(str(error))
        self.target = target
        self.error = error


async def _relay_latency(sender: DerpClient, receiver: DerpClient, deadline: float, samples: int) -> float:
    """Median one-way delivery time (s) of timestamped packets; raises TimeoutError at the deadline.

    Packets are re-sent until the first one arrives (registration and mesh learning take a moment),
    then `samples` packets are timed one at a time.
    """
    tag = os.urandom(8)  # tells our packets from anything else the throwaway key might receive

    def packet(seq: int) -> bytes:
        return b"cluster-probe " + tag + struct.pack(">Id", seq, time.perf_counter())

    async def wait_for(predicate_seq: int | None) -> float:
        while True:
            got = await receiver.recv_packet()
            data = got.data
            if got.src != sender.public_key or not data.startswith(b"cluster-probe " + tag) or len(data) != 34:
                continue
            seq, sent = struct.unpack(">Id", data[22:])
            if predicate_seq is None or seq == predicate_seq:
                return time.perf_counter() - sent

    async def resend() -> None:
        seq = 0
        while True:
            await sender.send(receiver.public_key, packet(seq))
            seq += 1
            await asyncio.sleep(RESEND_INTERVAL)

    loop = asyncio.get_running_loop()
    async with asyncio.timeout_at(deadline - time.monotonic() + loop.time()):
        sending = asyncio.create_task(resend())
        try:
            await wait_for(None)
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
        timings = []
        for i in range(samples):
            seq = 1_000_000 + i  # above anything the resend loop could have used
            await sender.send(receiver.public_key, packet(seq))
            timings.append(await wait_for(seq))
    return statistics.median(timings)


async def check_derp(target: Target, options: ProbeOptions | None = None) -> Check:
    """Two throwaway prober keys on this node; one relays timestamped packets to the other."""
    options = options or ProbeOptions()
    if target.stun_only:
        return Check("derp", "skip", "STUN-only node")
    try:
        async with asyncio.timeout(options.timeout * 2 + 2):  # connect + deliver, each bounded below
            try:
                sender, receiver = await _connect_pair(target, target, options)
            except _PairConnectError as exc:
                return Check("derp", "fail", describe_connect_error(exc.error, target.address, options.timeout))
            try:
                latency = await _relay_latency(sender, receiver, time.monotonic() + options.timeout, options.samples)
            except TimeoutError:
                return Check("derp", "fail", f"connected, but a packet was not relayed within {options.timeout:g}s")
            except Exception as exc:  # the server closing on us mid-check is a finding, not a crash
                return Check("derp", "fail", f"connection lost during relay: {exc}")
            finally:
                await _close_client(sender)
                await _close_client(receiver)
    except TimeoutError:
        return Check("derp", "fail", f"timed out after {options.timeout * 2 + 2:g}s")
    return Check("derp", "ok", "relayed", round(latency * 1000, 3))


async def check_mesh(src: Target, dst: Target, options: ProbeOptions | None = None) -> MeshReport:
    """A client on src sends to a client on dst: passes only when the two nodes mesh."""
    options = options or ProbeOptions()
    report = MeshReport(src.region_id, src.name, dst.name, "fail")
    try:
        async with asyncio.timeout(options.timeout * 2 + 2):
            try:
                sender, receiver = await _connect_pair(src, dst, options)
            except _PairConnectError as exc:
                cause = describe_connect_error(exc.error, exc.target.address, options.timeout)
                report.detail = f"cannot reach {exc.target.name}: DERP {cause}"
                return report
            try:
                latency = await _relay_latency(sender, receiver, time.monotonic() + options.timeout, options.samples)
            except TimeoutError:
                report.detail = f"packet not delivered across nodes {src.name}->{dst.name} within {options.timeout:g}s"
                return report
            except Exception as exc:
                report.detail = f"connection lost during relay {src.name}->{dst.name}: {exc}"
                return report
            finally:
                await _close_client(sender)
                await _close_client(receiver)
    except TimeoutError:
        report.detail = f"timed out after {options.timeout * 2 + 2:g}s"
        return report
    report.status, report.detail, report.latency_ms = "ok", "delivered", round(latency * 1000, 3)
    return report
