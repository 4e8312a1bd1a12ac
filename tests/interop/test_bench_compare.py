"""bench/derp_compare.py and bench/derp_table.py run: Tailscale's DERP client as the load, our node
and a stock derper side by side. Smoke tests only: timing is never a pass/fail criterion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--rounds", "1", "--seconds", "1", "--warmup", "0.5"]


def run_script(script: str, *args: str, out: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


@pytest.mark.parametrize("transport", ["plain", "tls", "websocket"])
def test_derp_compare_runs_against_both_servers(transport: str, bins: Path, tmp_path: Path) -> None:
    doc = run_script("derp_compare.py", "--transport", transport, *TINY, "--pairs", "2", out=tmp_path / "c.json")
    assert doc["ours"]["random"]["rounds"][0]["packets"] > 0, doc
    assert doc["derper"]["rounds"][0]["packets"] > 0, doc


@pytest.mark.parametrize("placement", ["same", "cross"])
def test_derp_compare_pins_pairs_on_two_workers(placement: str, bins: Path, tmp_path: Path) -> None:
    doc = run_script("derp_compare.py", "--workers", "2", "--placement", placement, *TINY, "--pairs", "2",
                     out=tmp_path / "c.json")
    ours = doc["ours"][placement]["rounds"][0]
    assert ours["packets"] > 0 and doc["derper"]["rounds"][0]["packets"] > 0, doc
    layout = ours["pair_workers"]
    # pairs spread over both workers, each pair's ends where the placement asked
    assert sorted(sender for sender, _ in layout) == [0, 1], layout
    assert all((sender == receiver) == (placement == "same") for sender, receiver in layout), layout
    # and the workers' own counters agree: no packet crossed, or (nearly) every one did
    counters = ours["server_counters"]
    assert counters["packets_received"] > 0, counters
    if placement == "same":
        assert counters["packets_forwarded_out"] == 0, counters
    else:
        crossed = counters["packets_forwarded_out"] + counters["packets_dropped"]
        assert crossed >= 0.95 * counters["packets_received"], counters
    assert counters["current_connections"] == 0, counters  # sampled before derpload closed its clients


def test_derp_compare_connections_idle_rss_and_handshakes(bins: Path, tmp_path: Path) -> None:
    doc = run_script("derp_compare.py", "--mode", "connections", "--transport", "tls", "--clients", "50",
                     "--concurrency", "8", *TINY, out=tmp_path / "c.json")
    for name in ("ours", "derper"):
        idle = doc["idle"][name]
        assert idle["clients"] == 50 and idle["failures"] == 0, idle
        assert idle["rss_after_kib"] > 0, idle
        (handshakes,) = doc["handshakes"][name]
        assert handshakes["handshakes"] > 0 and handshakes["failures"] == 0, handshakes


def test_derp_table_runs_one_row(bins: Path, tmp_path: Path) -> None:
    markdown = tmp_path / "table.md"
    doc = run_script("derp_table.py", "--transports", "plain", "--sizes", "100", "--pairs", "2",
                     "--only", "^plain/1w-pinned/", *TINY, "--paced-seconds", "1", "--markdown", str(markdown),
                     out=tmp_path / "t.json")
    (row,) = doc["relay"]
    assert row["row"] == "plain/1w-pinned/100B/2p", row
    for paced in (row["ours_paced"], row["derper_paced"]):  # the run below saturation, with its latency
        assert paced["packets"] > 0 and paced["rate"] > 0 and paced["latency_us"]["p99"] > 0, paced
    (group,) = doc["groups"]
    assert group["ours"]["random"]["rounds"][0]["packets"] > 0 and group["derper"]["rounds"][0]["packets"] > 0
    assert "| plain/1w-pinned/100B/2p |" in markdown.read_text()


@pytest.mark.skipif(not Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists(), reason="no cgroup v1 cpu controller")
def test_derp_table_capped_row_holds_each_server_to_its_quota(bins: Path, tmp_path: Path) -> None:
    doc = run_script("derp_table.py", "--transports", "plain", "--sizes", "100", "--pairs", "2",
                     "--only", "^plain/1w-capped/", *TINY, out=tmp_path / "t.json")
    (row,) = doc["relay"]
    assert row["row"] == "plain/1w-capped/100B/2p" and row["ours_paced"] is None, row
    (group,) = doc["groups"]
    for result in (group["ours"]["random"]["rounds"][0], group["derper"]["rounds"][0]):
        assert result["packets"] > 0, result
        # the quota is half a CPU: over a 1 s window no server may have had much more (CPU accounting,
        # not speed: the kernel enforces the quota in 10 ms periods)
        assert result["server_cpu_seconds"] <= 0.5 * 1.0 * 1.4, result
    assert not list(Path("/sys/fs/cgroup/cpu").glob("derp-bench-*")), "a capped server's cgroup was left behind"
