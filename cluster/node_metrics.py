"""Node-wide Prometheus metrics: whichever worker answers the admin request sums every worker's
counters (fetched over their admin unix sockets) so a scrape through the shared port sees the node."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from relay_worker.metrics import render_worker_metrics


async def fetch_unix_json(path: Path, target: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET target over a worker's admin unix socket, as JSON. Raises OSError, TimeoutError or ValueError."""
    # Plain HTTP over a unix socket: verify=False only skips loading a trust store no TLS uses.
    transport = httpx.AsyncHTTPTransport(uds=str(path), verify=False)
    try:
        async with asyncio.timeout(timeout), httpx.AsyncClient(transport=transport, timeout=None,
                                                               trust_env=False) as client:
            response = await client.get(f"http://worker{target}")
    except httpx.HTTPError as exc:
        raise OSError(f"{path}: {exc or type(exc).__name__}") from exc
    if response.status_code != 200:
        raise OSError(f"{path}: HTTP {response.status_code}")
    doc: dict[str, Any] = json.loads(response.content)
    return doc


async def gather_worker_docs(run_dir: Path, worker_count: int, own_index: int,
                             own_doc: dict[str, Any]) -> list[dict[str, Any]]:
    async def one(index: int) -> dict[str, Any] | None:
        if index == own_index:
            return own_doc
        try:
            return await fetch_unix_json(run_dir / f"worker-{index}.sock", "/debug/varz?local=1")
        except (OSError, ValueError, TimeoutError):
            return None  # a restarting worker: its counters are missing from this scrape only

    docs = await asyncio.gather(*(one(i) for i in range(worker_count)))
    return [doc for doc in docs if doc is not None]


def node_metrics_text(docs: list[dict[str, Any]], supervisor: dict[str, Any] | None) -> str:
    extra: dict[str, float] = {
        "derp_cluster_workers_up": float(len(docs)),
    }
    if docs:
        directory = docs[0].get("directory", {})
        extra["derp_cluster_directory_keys"] = float(directory.get("size", 0))
        mesh = [doc.get("mesh", {}) for doc in docs]
        extra["derp_cluster_mesh_peers_alive"] = float(sum(m.get("peers_alive", 0) for m in mesh))
        extra["derp_cluster_cross_worker_packets_out"] = float(sum(m.get("packets_out", 0) for m in mesh))
        extra["derp_cluster_cross_worker_packets_in"] = float(sum(m.get("packets_in", 0) for m in mesh))
        extra["derp_cluster_mesh_packets_dropped_full"] = float(
            sum(m.get("packets_dropped_full", 0) for m in mesh))
    if supervisor is not None:
        extra["derp_cluster_worker_restarts"] = float(sum(w.get("restarts", 0) for w in supervisor["workers"]))
    stun: dict[str, int] = {}
    for doc in docs:
        stats = doc.get("stun")
        if not stats:
            continue
        stun["response"] = stun.get("response", 0) + stats.get("responses", 0)
        for reason, count in stats.get("drops", {}).items():
            stun[reason] = stun.get(reason, 0) + count
    return render_worker_metrics([doc["worker"] for doc in docs], extra, stun_dispositions=stun)


def _node_stun(docs: list[dict[str, Any]]) -> dict[str, int] | None:
    stun: dict[str, int] = {}
    seen = False
    for doc in docs:
        stats = doc.get("stun")
        if not stats:
            continue
        seen = True
        stun["response"] = stun.get("response", 0) + stats.get("responses", 0)
        for reason, count in stats.get("drops", {}).items():
            stun[reason] = stun.get(reason, 0) + count
    return stun if seen else None


def node_varz_text(docs: list[dict[str, Any]]) -> str:
    """derper's /debug/varz (Prometheus text, derper's names), summed over the node's workers."""
    from relay_worker.metrics import render_derper_varz

    total = docs[0].get("directory", {}).get("size") if docs else None
    return render_derper_varz([doc["worker"] for doc in docs], _node_stun(docs),
                              clients_total=int(total) if total is not None else None)


def node_expvar(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """derper's /debug/vars (expvar JSON), summed over the node's workers."""
    from relay_worker.metrics import derper_expvar

    return derper_expvar([doc["worker"] for doc in docs], _node_stun(docs))
