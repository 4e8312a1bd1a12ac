"""Human output of `cluster bench`: a rich progress bar while running, a table at the end."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from .runner import Progress as ProgressFn


class Ui:
    """A progress bar on stderr (stdout stays clean for the table or the JSON)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Progress | None = None
        self.tasks: dict[tuple[str, str], TaskID] = {}

    def __enter__(self) -> Ui:
        if self.enabled:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     console=Console(stderr=True), transient=True)
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def progress_for(self, label: str) -> ProgressFn:
        def update(phase: str, done: float, total: float, info: str) -> None:
            if self.progress is None:
                return
            key = (label, phase)
            task = self.tasks.get(key)
            if task is None:
                task = self.tasks[key] = self.progress.add_task(f"{label}: {phase}", total=total or None, info="")
            self.progress.update(task, completed=done, total=total or None, info=info)
        return update


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "packets_per_sec": _median([r["packets_per_sec"] for r in runs]),
        "server_cpu_us_per_packet": _median([r["server_cpu_us_per_packet"] for r in runs]),
        "latency_p99_us": _median([r["latency_us"]["p99"] for r in runs]),
    }


def ratios(target: dict[str, Any], floor: dict[str, Any]) -> dict[str, float | None]:
    """target / floor over medians: packets/s (higher is better), CPU µs per packet and p99 (lower is better)."""
    return {
        "packets_per_sec": _ratio(target["packets_per_sec"], floor["packets_per_sec"]),
        "cpu_us_per_packet": _ratio(target["server_cpu_us_per_packet"], floor["server_cpu_us_per_packet"]),
        "latency_p99": _ratio(target["latency_p99_us"], floor["latency_p99_us"]),
    }


def combine(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One document from rounds of target and floor runs.

    The top level is the target's run with the median packets/s (so it reads like a plain run);
    `floor` / `floor_per_frame` are the floors' median runs; `ratio` / `ratio_per_frame` compare
    medians of each figure across rounds, and `rounds` keeps every run's headline figures.
    """
    def representative(label: str) -> dict[str, Any]:
        ordered = sorted(runs[label], key=lambda r: r["packets_per_sec"])
        return dict(ordered[len(ordered) // 2])

    result = representative("target")
    target_summary = _summary(runs["target"])
    result["median"] = target_summary
    result["rounds"] = {label: [_summary([r]) for r in label_runs] for label, label_runs in runs.items()}
    for label, key in (("floor", ""), ("floor (per-frame writes)", "_per_frame")):
        if label in runs:
            floor = representative(label)
            floor["median"] = _summary(runs[label])
            result["floor" + key] = floor
            result["ratio" + key] = ratios(target_summary, floor["median"])
    return result


def _num(value: float | None, fmt: str = ",.0f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def _relay_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    lat = r["latency_us"]
    return [
        ("placement", r["placement"]),
        ("packets/s", _num(r["packets_per_sec"])),
        ("Mbit/s", _num(r["mbit_per_sec"], ",.1f")),
        ("latency p50 (ms)", _num(lat["p50"], ".3f", 1e-3)),
        ("latency p99 (ms)", _num(lat["p99"], ".3f", 1e-3)),
        ("latency p99.9 (ms)", _num(lat["p999"], ".3f", 1e-3)),
        ("latency max (ms)", _num(lat["max"], ".3f", 1e-3)),
        ("sent / received", f"{r['sent']:,} / {r['received']:,}"),
        ("drops", f"{r['drops']:,}"),
        ("server CPU %", _num(r["server_cpu_percent"], ".0f")),
        ("server CPU µs/packet", _num(r["server_cpu_us_per_packet"], ".2f")),
        ("load generator CPU %", _num(r["client_cpu_percent"], ".0f")),
        (f"other CPU % ({r['cores']} cores)", _num(r["other_cpu_percent"], ".0f")),
        ("lost connections", str(r["lost_connections"])),
    ]


def render(result: dict[str, Any]) -> None:
    console = Console()
    mode = result["mode"]
    if mode == "relay":
        title = (f"relay {result['url']}: {result['pairs']} pairs, {result['size']} B, window {result['window']}, "
                 f"{result['seconds']:g} s, {result['procs']} generator processes")
        table = Table(title=title)
        table.add_column("")
        table.add_column("target", justify="right")
        columns = [_relay_rows(result)]
        for key, heading in (("", "floor (coalesced)"), ("_per_frame", "floor (per-frame writes)")):
            floor = result.get("floor" + key)
            if floor is None:
                continue
            table.add_column(heading, justify="right")
            table.add_column("ratio", justify="right")
            ratio = result["ratio" + key]
            ratio_of = {"packets/s": ratio["packets_per_sec"], "server CPU µs/packet": ratio["cpu_us_per_packet"],
                        "latency p99 (ms)": ratio["latency_p99"]}
            columns.append(_relay_rows(floor))
            columns.append([(name, _num(ratio_of[name], ".2f") if name in ratio_of else "")
                            for name, _ in _relay_rows(floor)])
        for cells in zip(*columns, strict=True):
            table.add_row(cells[0][0], *(value for _, value in cells))
        console.print(table)
        if "rounds" in result and len(result["rounds"]["target"]) > 1:
            console.print(f"{len(result['rounds']['target'])} rounds; ratios compare the medians of each figure")
        counters = result.get("server_counters")
        if counters:
            console.print("server counters over the window: " + ", ".join(f"{k}={v:,}" for k, v in counters.items()))
        return
    table = Table(title=f"{mode}: {result['url']}")
    table.add_column("")
    table.add_column("value", justify="right")
    if mode == "connect":
        lat = result["handshake_latency_us"]
        rows = [
            ("concurrency", str(result["concurrency"])),
            ("handshakes/s", _num(result["handshakes_per_sec"])),
            (f"handshakes/s per worker ({result['workers']})", _num(result["handshakes_per_sec_per_worker"])),
            ("handshake p50 (ms)", _num(lat["p50"], ".2f", 1e-3)),
            ("handshake p99 (ms)", _num(lat["p99"], ".2f", 1e-3)),
            ("errors", f"{result['errors']:,} {result['error_kinds'] or ''}"),
            ("server CPU %", _num(result["server_cpu_percent"], ".0f")),
            ("server CPU µs/handshake", _num(result["server_cpu_us_per_handshake"], ".1f")),
            ("handshakes per CPU-second (one busy core)", _num(result["handshakes_per_cpu_second"])),
            ("load generator CPU %", _num(result["client_cpu_percent"], ".0f")),
        ]
    else:
        rows = [
            ("clients", f"{result['clients']:,}"),
            ("connected in (s)", _num(result["connect_seconds"], ".1f")),
            ("still open", f"{result['alive']:,}"),
            ("server RSS before (KiB)", f"{sum(result['rss_before_kib'].values()):,}"),
            ("server RSS after (KiB)", f"{sum(result['rss_after_kib'].values()):,}"),
            ("RSS per idle client (KiB)", _num(result["rss_per_client_kib"], ".2f")),
            ("RSS per client after relaying (KiB)", _num(result["rss_per_client_after_relay_kib"], ".2f")),
            ("relay check", f"{result['relay_delivered']:,} of {result['relay_checked']:,} delivered"),
        ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
