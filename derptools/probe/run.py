"""Running every check of every node, with a bound on how many run at once."""

from __future__ import annotations

import asyncio
from typing import Any

from .checks import check_http_probe, check_stun, check_tls
from .model import Check, MeshReport, NodeReport, ProbeOptions, Target
from .relay import check_derp, check_mesh
from .targets import mesh_pairs


async def _tcp_checks(target: Target, options: ProbeOptions) -> list[Check]:
    if target.stun_only:
        skip = "STUN-only node"
        return [Check("tls", "skip", skip), Check("probe", "skip", skip), Check("derp", "skip", skip)]
    return list(await asyncio.gather(check_tls(target, options), check_http_probe(target, options),
                                     check_derp(target, options)))


def _stun_check(target: Target, options: ProbeOptions) -> Any:
    return check_stun(target.stun_host or target.dial_host, target.stun_port, options.timeout)


async def probe_node(target: Target, options: ProbeOptions | None = None) -> NodeReport:
    """All checks of one node: STUN first, alone, then TLS, /derp/probe and DERP together."""
    options = options or ProbeOptions()
    checks = [await _stun_check(target, options), *await _tcp_checks(target, options)]
    return NodeReport(target, {check.name: check for check in checks})


async def probe_all(targets: list[Target], options: ProbeOptions | None = None,
                    *, mesh: bool = True) -> tuple[list[NodeReport], list[MeshReport]]:
    """Every node concurrently, then the cross-node pairs whose both ends relayed on their own.

    STUN runs as a phase of its own: its RTT is taken when the event loop gets to the datagram, so
    TLS handshakes and key generation running alongside would inflate a loopback 0.1 ms to several.
    """
    options = options or ProbeOptions()
    limit = asyncio.Semaphore(64)  # a large map must not open thousands of sockets at once

    async def bounded(coro: Any) -> Any:
        async with limit:
            return await coro

    stuns = await asyncio.gather(*(bounded(_stun_check(t, options)) for t in targets))
    rest = await asyncio.gather(*(bounded(_tcp_checks(t, options)) for t in targets))
    nodes = [NodeReport(t, {c.name: c for c in [stun, *others]}) for t, stun, others in zip(targets, stuns, rest,
                                                                                          strict=True)]
    relays = {id(report.target) for report in nodes if report.checks["derp"].status == "ok"}
    meshes: list[MeshReport] = []
    pending = []
    for src, dst in (mesh_pairs(targets) if mesh else []):
        if id(src) in relays and id(dst) in relays:
            pending.append(bounded(check_mesh(src, dst, options)))
        else:
            broken = src.name if id(src) not in relays else dst.name
            meshes.append(MeshReport(src.region_id, src.name, dst.name, "skip",
                                     f"skipped: DERP on {broken} failed on its own"))
    meshes.extend(await asyncio.gather(*pending))
    meshes.sort(key=lambda m: (m.region_id or 0, m.src, m.dst))
    return nodes, meshes
