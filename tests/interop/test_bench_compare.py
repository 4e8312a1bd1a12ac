"""bench/derp_compare.py runs: Tailscale's DERP client as the load, our node and a stock derper
side by side. A smoke test only: timing is never a pass/fail criterion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("transport", ["plain", "tls", "websocket"])
def test_derp_compare_runs_against_both_servers(transport: str, bins: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "derp_compare.py"), "--transport", transport,
                           "--rounds", "1", "--seconds", "1", "--warmup", "0.5", "--pairs", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for name in ("ours", "derper"):
        assert doc["rounds"][name][0]["packets"] > 0, doc
