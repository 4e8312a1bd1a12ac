"""Merging per-process latency histograms and reading percentiles off them."""

from __future__ import annotations

from collections.abc import Iterable


def merge(histograms: Iterable[dict[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for hist in histograms:
        for value, count in hist.items():
            merged[int(value)] = merged.get(int(value), 0) + count
    return merged


def percentiles(hist: dict[int, int], points: Iterable[float] = (50.0, 99.0, 99.9)) -> dict[str, float | None]:
    """Nearest-rank percentiles of a {value: count} histogram, plus mean and max.

    Keys are p50, p99, p999 (the decimal point dropped), so JSON consumers need no quoting games.
    """
    total = sum(hist.values())
    out: dict[str, float | None] = {}
    names = [(p, "p" + f"{p:g}".replace(".", "")) for p in points]
    if not total:
        empty: dict[str, float | None] = {name: None for _, name in names}
        return empty | {"mean": None, "max": None, "samples": 0}
    ordered = sorted(hist.items())
    for p, name in names:
        rank = max(1, -(-total * p // 100))  # ceil without floats drifting
        seen = 0
        for value, count in ordered:
            seen += count
            if seen >= rank:
                out[name] = float(value)
                break
    out["mean"] = sum(v * c for v, c in ordered) / total
    out["max"] = float(ordered[-1][0])
    out["samples"] = total
    return out
