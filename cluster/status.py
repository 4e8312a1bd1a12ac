"""`cluster status`: what a running node's workers are doing, as a table or JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from .config import Config


def fetch_unix(path: Path, target: str, timeout: float = 2.0) -> bytes:
    """GET target over an admin unix socket; returns the body. Raises OSError when the worker does not
    answer 200 (or at all), so callers treat a missing worker and a broken one alike."""
    # Plain HTTP over a unix socket: verify=False only skips loading a trust store no TLS uses.
    transport = httpx.HTTPTransport(uds=str(path), verify=False)
    try:
        with httpx.Client(transport=transport, timeout=timeout, trust_env=False) as client:
            response = client.get(f"http://worker{target}")
    except httpx.HTTPError as exc:
        raise OSError(f"{path}{target}: {exc or type(exc).__name__}") from exc
    if response.status_code != 200:
        raise OSError(f"{path}{target}: HTTP {response.status_code} {response.reason_phrase}")
    return response.content


def collect_status(run_dir: Path) -> dict[str, Any]:
    sup_file = run_dir / "supervisor.json"
    if not sup_file.exists():
        raise FileNotFoundError(f"no cluster state in {run_dir} (is `cluster up` running with this --run-dir?)")
    sup = json.loads(sup_file.read_text())
    workers = []
    node: dict[str, Any] = {}
    meshes: list[dict[str, Any]] = []
    for slot in sup["workers"]:
        row: dict[str, Any] = {"index": slot["index"], "pid": slot["pid"], "restarts": slot["restarts"],
                               "uptime": time.time() - slot["started"] if slot["pid"] else 0.0}
        try:
            doc = json.loads(fetch_unix(run_dir / f"worker-{slot['index']}.sock", "/debug/varz"))
            stats = doc["worker"]
            row.update(clients=stats["current_connections"], packets=stats["packets_sent"],
                       forwarded_out=stats["packets_forwarded_out"], drops=stats["packets_dropped"],
                       drops_by_reason={k: v for k, v in stats["drops"].items() if v}, up=True)
            if "directory" in doc:
                node["directory"] = doc["directory"]
            meshes.append(doc.get("mesh", {}))
        except (OSError, ValueError, KeyError) as exc:
            row.update(up=False, error=str(exc))
        workers.append(row)
    return {"supervisor_pid": sup["pid"], "listen": sup["listen"], "workers": workers,
            "recent_restarts": sup.get("recent_restarts", []), "nodes": summarize_nodes(meshes), **node}


def summarize_nodes(meshes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Other nodes as this node's workers see them: merged over workers, one row per node."""
    nodes: dict[str, dict[str, Any]] = {}
    for mesh in meshes:
        for name, peer in mesh.get("peers", {}).items():
            row = nodes.setdefault(peer["node"], {"node": peer["node"], "region": peer["region"], "alive": False,
                                                  "workers": set(), "last_heard_ago": None, "keys": 0,
                                                  "forwarded_packets": 0})
            row["workers"].add(name)
            row["alive"] = row["alive"] or peer["alive"]
            heard = peer.get("last_heard_ago")
            if heard is not None and (row["last_heard_ago"] is None or heard < row["last_heard_ago"]):
                row["last_heard_ago"] = heard
            row["forwarded_packets"] += peer.get("packets_out", 0)
        # keys owned: the same on every worker's replica, so take one worker's count per peer
        if mesh is meshes[0]:
            for peer in mesh.get("peers", {}).values():
                nodes[peer["node"]]["keys"] += peer.get("keys", 0)
    rows = []
    for row in nodes.values():
        row["workers"] = sorted(row["workers"])
        row["state"] = "alive" if row["alive"] else "dead"
        rows.append(row)
    return sorted(rows, key=lambda r: r["node"])


def run_status(config: Config, *, as_json: bool) -> int:
    try:
        status = collect_status(config.run_path)
    except FileNotFoundError as exc:
        print(f"cluster status: {exc}")
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"workers of {status['listen']} (supervisor pid {status['supervisor_pid']})")
    for col in ("worker", "pid", "uptime", "clients", "packets", "fwd out", "drops", "restarts"):
        table.add_column(col, justify="right")
    for row in status["workers"]:
        if not row.get("up"):
            table.add_row(str(row["index"]), str(row["pid"]), "-", "down", "-", "-", "-", str(row["restarts"]))
            continue
        table.add_row(str(row["index"]), str(row["pid"]), f"{row['uptime']:.0f}s", str(row["clients"]),
                      str(row["packets"]), str(row["forwarded_out"]), str(row["drops"]), str(row["restarts"]))
    console.print(table)
    if "directory" in status:
        d = status["directory"]
        console.print(f"directory: {d['size']} keys, {d['entries']} entries, {d['tombstones']} tombstones")
    if status["nodes"]:
        nodes = Table(title="mesh members (this node's workers included)")
        for col in ("node", "region", "state", "last heard", "keys owned", "forwarded packets", "workers"):
            nodes.add_column(col)
        for row in status["nodes"]:
            heard = "never" if row["last_heard_ago"] is None else f"{row['last_heard_ago']:.1f}s ago"
            nodes.add_row(row["node"], str(row["region"]), row["state"], heard, str(row["keys"]),
                          str(row["forwarded_packets"]), ", ".join(row["workers"]))
        console.print(nodes)
    for restart in status["recent_restarts"][-5:]:
        console.print(f"restart: worker {restart['worker']} exited {restart['exit']} at "
                      f"{time.strftime('%H:%M:%S', time.localtime(restart['at']))}")
    return 0
