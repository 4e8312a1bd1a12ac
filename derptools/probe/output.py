"""The report: JSON for machines, a rich table and one line per failure for people."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

from .model import LABELS, Check, MeshReport, NodeReport, join_hostport


def report_json(nodes: list[NodeReport], meshes: list[MeshReport]) -> dict[str, Any]:
    ok = all(n.ok for n in nodes) and not any(m.failed for m in meshes)
    return {
        "ok": ok,
        "nodes": [{
            "name": n.target.name, "region_id": n.target.region_id, "region_code": n.target.region_code,
            "url": n.target.url, "stun": join_hostport(n.target.stun_host or n.target.dial_host, n.target.stun_port)
            if n.target.stun_port >= 0 else None,
            "ok": n.ok, "summary": n.summary(),
            "checks": {name: asdict(check) for name, check in n.checks.items()},
        } for n in nodes],
        "mesh": [asdict(m) for m in meshes],
    }


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def _cell(check: Check, text: str) -> str:
    style = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}[check.status]
    return f"[{style}]{text}[/{style}]"


def render_table(nodes: list[NodeReport], meshes: list[MeshReport], file: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = file or sys.stdout
    # Piped output has no terminal width; rich would squeeze to 80 columns and wrap the addresses.
    console = Console(file=out, width=None if out.isatty() else 160, highlight=False)
    table = Table(title="DERP probe", title_justify="left")
    for column in ("Node", "Region", "STUN", "Mapped address", "TLS", "/derp/probe", "DERP", "Result"):
        table.add_column(column, no_wrap=column != "Result")
    for n in nodes:
        c = n.checks
        stun = c["stun"]
        tls = c["tls"]
        days = tls.extra.get("days_left")
        tls_text = {"skip": "http" if not n.target.stun_only else "-"}.get(tls.status) or (
            f"{days} days" if days is not None else "fail")
        if tls.status == "warn" and n.target.insecure:
            tls_text += " (insecure)"
        region = f"{n.target.region_id or '-'}" + (f" {n.target.region_code}" if n.target.region_code else "")
        result = "[green]ok[/green]" if n.ok else "[red]FAIL[/red]"
        if n.ok and any(check.status == "warn" for check in c.values()):
            result = "[yellow]ok (warn)[/yellow]"
        table.add_row(
            escape(n.target.name), escape(region),
            _cell(stun, {"skip": "off"}.get(stun.status) or (_ms(stun.latency_ms) or "fail")),
            escape(stun.extra.get("mapped", "")),
            _cell(tls, escape(tls_text)),
            _cell(c["probe"], {"skip": "-"}.get(c["probe"].status) or (
                f"{c['probe'].extra['status']}" if "status" in c["probe"].extra else "fail")),
            _cell(c["derp"], {"skip": "-"}.get(c["derp"].status) or (_ms(c["derp"].latency_ms) or "fail")),
            result)
    console.print(table)
    if meshes:
        mesh_table = Table(title="Cross-node delivery (same region)", title_justify="left")
        for column in ("Region", "From -> To", "Latency", "Result"):
            mesh_table.add_column(column)
        for m in meshes:
            style = {"ok": "green", "fail": "red", "skip": "dim"}[m.status]
            mesh_table.add_row(str(m.region_id), escape(f"{m.src} -> {m.dst}"), _ms(m.latency_ms),
                               f"[{style}]{escape(m.status if m.status == 'ok' else m.detail)}[/{style}]")
        console.print(mesh_table)
    # The full reasons go on their own lines: a table cell would truncate or wrap them.
    for n in nodes:
        warns = [f"{LABELS[k]} {v.detail}" for k, v in n.checks.items() if v.status == "warn"]
        if not n.ok:
            print(f"FAIL {n.target.name} ({n.target.url}): {n.summary()}", file=out)
        elif warns:
            print(f"WARN {n.target.name}: {'; '.join(warns)}", file=out)
    for m in meshes:
        if m.failed:
            print(f"FAIL cross-node {m.src}->{m.dst}: {m.detail}", file=out)
    failed = sum(not n.ok for n in nodes) + sum(m.failed for m in meshes)
    print(f"{len(nodes)} node(s), {len(meshes)} cross-node pair(s): "
          + (f"{failed} failed" if failed else "all checks passed"), file=out)
