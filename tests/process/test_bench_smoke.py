"""`cluster bench` runs end to end and reports what it promises; the floor relay really relays.

Smoke only: a benchmark's figures depend on the machine and its load, so nothing here asserts a
rate or a latency, only that the documents have their fields and that packets went through.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay_worker.client import DerpClient
from relay_worker.keys import PrivateKey
from tests.support import ClusterProcess, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FLOOR = ROOT / "bench" / "floor_relay.py"
RELAY_FIELDS = {
    "mode", "url", "placement", "pairs", "size", "window", "seconds", "procs", "sent", "received", "drops",
    "window_received", "packets_per_sec", "mbit_per_sec", "latency_us", "server_pids", "server_cpu_seconds",
    "server_cpu_percent", "server_cpu_us_per_packet", "client_cpu_percent", "machine_cpu_percent",
}


def bench(*args: str, timeout: float = 90) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "cluster", "bench", *args, "--json"], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, f"cluster bench {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


def check_relay_doc(doc: dict[str, Any], pairs: int) -> None:
    assert doc.keys() >= RELAY_FIELDS, f"missing: {RELAY_FIELDS - doc.keys()}"
    assert doc["mode"] == "relay" and doc["pairs"] == pairs
    assert doc["received"] > 0 and doc["window_received"] > 0
    assert doc["received"] <= doc["sent"]
    assert doc["drops"] == doc["sent"] - doc["received"]
    assert set(doc["latency_us"]) >= {"p50", "p99", "p999", "max", "samples"}
    assert doc["latency_us"]["samples"] == doc["window_received"]
    assert doc["server_cpu_us_per_packet"] is not None and doc["server_cpu_us_per_packet"] >= 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterProcess]:
    with ClusterProcess(workers=1) as running:
        yield running


@pytest.fixture
def floor() -> Iterator[tuple[str, int]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FLOOR), "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening" in line, line + proc.stdout.read()
        yield f"http://127.0.0.1:{port}/derp", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def test_relay_json_against_cluster(cluster: ClusterProcess) -> None:
    doc = bench("relay", "--url", cluster.url, "--run-dir", str(cluster.run_dir), "--seconds", "1",
                "--warmup", "0.2", "--pairs", "2")
    check_relay_doc(doc, 2)
    assert doc["server_pids"] == cluster.worker_pids()
    # The server's own counters saw the packets the generator counted.
    assert doc["server_counters"]["packets_sent"] > 0


def test_relay_same_worker_and_compare_floor(cluster: ClusterProcess) -> None:
    doc = bench("relay", "--url", cluster.url, "--run-dir", str(cluster.run_dir), "--seconds", "1",
                "--warmup", "0.2", "--pairs", "2", "--same-worker", "--compare-floor", "--floor-mode", "coalesced")
    check_relay_doc(doc, 2)
    assert doc["placement"] == "same-worker"
    assert doc["pair_workers"] == [(0, 0), (0, 0)] or doc["pair_workers"] == [[0, 0], [0, 0]]
    check_relay_doc(doc["floor"], 2)
    assert doc["floor"]["target"] == "floor"
    assert set(doc["ratio"]) == {"packets_per_sec", "cpu_us_per_packet", "latency_p99"}
    assert doc["ratio"]["packets_per_sec"] > 0


def test_connect_and_idle_modes(cluster: ClusterProcess) -> None:
    doc = bench("connect", "--url", cluster.url, "--run-dir", str(cluster.run_dir), "--seconds", "1",
                "--warmup", "0.2", "--concurrency", "4", "--procs", "1")
    assert doc["handshakes"] > 0 and doc["errors"] == 0
    assert doc["handshakes_per_sec_per_worker"] > 0
    idle = bench("idle", "--url", cluster.url, "--run-dir", str(cluster.run_dir), "--clients", "40", "--procs", "2",
                 "--settle", "0.2")
    assert idle["alive"] == 40 and idle["server_connections_added"] == 40
    assert idle["relay_checked"] == 40 and idle["relay_delivered"] == 40
    assert idle["rss_per_client_kib"] is not None


def test_floor_relay_relays(floor: tuple[str, int]) -> None:
    url, pid = floor
    doc = bench("relay", "--url", url, "--server-pids", str(pid), "--seconds", "1", "--warmup", "0.2",
                "--pairs", "2", "--procs", "1")
    check_relay_doc(doc, 2)
    assert doc["drops"] == 0  # nothing in the floor can drop: no queues, no limits


async def test_floor_relay_speaks_derp_to_the_project_client(floor: tuple[str, int]) -> None:
    """An independent client (relay_worker.client, streams-based) completes the handshake and relays."""
    url, _ = floor
    a = await DerpClient.connect(url, PrivateKey.generate())
    b_key = PrivateKey.generate()
    b = await DerpClient.connect(url, b_key)
    try:
        assert a.server_info is not None and a.server_info.version == 2
        await a.send(b_key.public().raw, b"hello floor")
        got = await b.recv_packet(timeout=5)
        assert got.src == a.public_key and got.data == b"hello floor"
    finally:
        await a.close()
        await b.close()


PROFILE = ROOT / "bench" / "profile_hot_path.py"
INTEROP_BIN = ROOT / "tests" / "interop" / "bin"


def test_pyspy_layers_charges_each_sample_to_its_layer(tmp_path: Path) -> None:
    """Interpreter internals go to the calling Python frame, syscalls to their own layer, the loop
    thread in epoll is idle, other threads are left out."""
    sys.path.insert(0, str(ROOT / "bench"))
    from pyspy_layers import summarise_raw

    loop = "uv_run (core.c:1);uv__io_poll (linux.c:2)"
    feed = (f"{loop};DerpServerConn.data_received (relay_worker/conn.py:154);"
            "FrameParser.feed (relay_worker/frames.py:345)")
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        f"{feed};Struct_unpack_from (_struct.c.h:117) 3",
        f"{loop};DerpServerConn.data_received (relay_worker/conn.py:161);"
        "ServerSession.deliver_frames (relay_worker/session.py:498);write (libc.so.6) 5",
        f"{loop};epoll_pwait (libc.so.6) 2",
        "Thread._bootstrap (threading.py:1002);Event.wait (threading.py:629) 7",
    ]) + "\n")
    doc = summarise_raw(raw)
    assert doc["samples"] == 10 and doc["other_thread_samples"] == 7
    assert doc["idle_share"] == 20.0
    assert doc["busy_layers"] == {"syscall write": 62.5, "our frame parser: FrameParser.feed": 37.5}
    assert ["FrameParser.feed (frames.py:345)", 37.5] in doc["our_lines_of_busy"]


@pytest.mark.skipif(shutil.which("perf") is None, reason="perf (linux-perf) is not installed")
@pytest.mark.skipif(shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None,
                    reason="py-spy is not in the venv (.venv/bin/pip install py-spy)")
@pytest.mark.skipif(not (INTEROP_BIN / "derpload").exists() or not (INTEROP_BIN / "derper").exists(),
                    reason="the interop binaries are not built (tests/interop)")
def test_profile_hot_path_runs_every_probe(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(PROFILE), "--out", str(tmp_path), "--seconds", "1",
                           "--sizes-seconds", "0.5", "--pyspy-seconds", "2", "--pyspy-rate", "50", "--pairs", "2",
                           "--probes", "cpu,syscalls,sizes,perf,pyspy", "--server-cpus", "0", "--load-cpus", "1"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"profile_hot_path failed:\n{proc.stdout}\n{proc.stderr}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in ("ours", "derper"):
        runs = summary["results"][name]
        assert runs["cpu"]["packets"] > 0 and runs["cpu"]["cpu_us_per_packet"] > 0
        assert runs["syscalls"]["window_packets"] > 0
        assert runs["syscalls"]["syscalls_per_packet"]["read"] > 0
        assert runs["syscalls"]["syscalls_per_packet"]["write"] > 0
        assert runs["sizes"]["frames_per_data_call"]["read"] > 0
        assert (tmp_path / f"{name}-perf-3.sym.txt").read_text().strip()
    assert "pyspy" not in summary["results"]["derper"]
    assert summary["results"]["ours"]["pyspy"]["pyspy_samples"] > 0
    assert "| ours |" in proc.stdout and "| derper |" in proc.stdout
