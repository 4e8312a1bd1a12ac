"""The HTTP endpoints answer as derper's do (status codes and headers)."""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request

import pytest

from tests.support import ClusterProcess


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def test_home_and_robots(one_worker: ClusterProcess) -> None:
    status, headers, body = fetch(one_worker.base + "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"DERP" in body
    status, _, body = fetch(one_worker.base + "/robots.txt")
    assert status == 200 and body == b"User-agent: *\nDisallow: /\n"


def test_generate_204_with_and_without_challenge(one_worker: ClusterProcess) -> None:
    status, headers, body = fetch(one_worker.base + "/generate_204")
    assert status == 204 and body == b""
    assert headers["cache-control"] == "no-cache, no-store, must-revalidate, no-transform, max-age=0"
    assert "x-tailscale-response" not in headers
    status, headers, _ = fetch(one_worker.base + "/generate_204", headers={"X-Tailscale-Challenge": "abc.DEF:1-2_3"})
    assert headers["x-tailscale-response"] == "response abc.DEF:1-2_3"
    _, headers, _ = fetch(one_worker.base + "/generate_204", headers={"X-Tailscale-Challenge": "bad challenge!"})
    assert "x-tailscale-response" not in headers
    _, headers, _ = fetch(one_worker.base + "/generate_204", headers={"X-Tailscale-Challenge": "a" * 65})
    assert "x-tailscale-response" not in headers


@pytest.mark.parametrize("path", ["/derp/probe", "/derp/latency-check"])
def test_probe_paths(one_worker: ClusterProcess, path: str) -> None:
    for method in ("GET", "HEAD"):
        status, headers, _ = fetch(one_worker.base + path, method=method)
        assert status == 200 and headers["access-control-allow-origin"] == "*"
    status, _, body = fetch(one_worker.base + path, method="POST")
    assert status == 405 and body == b"bogus probe method\n"


def test_derp_without_upgrade_is_426(one_worker: ClusterProcess) -> None:
    status, _, body = fetch(one_worker.base + "/derp")
    assert status == 426 and b"DERP requires connection upgrade" in body


def test_admin_paths_answer_loopback(one_worker: ClusterProcess) -> None:
    status, _, body = fetch(one_worker.base + "/debug/varz")  # derper's: Prometheus text (D6)
    assert status == 200 and b"\nderp_accepts " in body
    status, _, body = fetch(one_worker.base + "/debug/varz?local=1")  # this worker's JSON
    assert status == 200 and "worker" in json.loads(body)
    status, _headers, body = fetch(one_worker.base + "/metrics")
    assert status == 200 and b"derp_current_connections" in body


def test_server_key_file_is_private_and_stable(one_worker: ClusterProcess) -> None:
    path = one_worker.state_dir / "derp.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["PrivateKey"].startswith("privkey:") and len(doc["PrivateKey"]) == 8 + 64


def test_derper_varz_splits_drops_by_kind_and_counts_dropped_bytes() -> None:
    from relay_worker import frames as F
    from relay_worker.metrics import render_derper_varz
    from relay_worker.stats import WorkerStats, packet_kind

    stats = WorkerStats()
    disco = F.DISCO_MAGIC + bytes(F.DISCO_MIN_LEN)
    stats.drop("unknown_dest", kind=packet_kind(disco), size=len(disco))
    stats.drop("unknown_dest", kind=packet_kind(b"x" * 100), size=100)
    stats.drop("queue_head", 2)
    stats.home_moves_in += 1
    text = render_derper_varz([stats.snapshot()])
    assert 'derp_packets_dropped{reason="unknown_dest",kind="disco"} 1' in text
    assert 'derp_packets_dropped{reason="unknown_dest",kind="other"} 1' in text
    assert 'derp_packets_dropped{reason="queue_head",kind="other"} 2' in text
    assert f'derp_bytes_dropped{{reason="unknown_dest",kind="disco"}} {len(disco)}' in text
    assert 'derp_bytes_dropped{reason="unknown_dest",kind="other"} 100' in text
    assert "derp_home_moves_in 1" in text and "derp_home_moves_out 0" in text
