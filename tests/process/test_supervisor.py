"""The supervisor over real `cluster up` processes: its liveness ping, its one shutdown budget, its
preflight, and signals queued and handled once each (cluster/supervisor.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from relay_worker.client import DerpClient
from relay_worker.keys import PrivateKey
from tests.support import ClusterProcess, await_until, wait_until

pytestmark = pytest.mark.slow


def process_gone(pid: int) -> bool:
    """The pid is no longer a live process (reaped, or a zombie nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def count(cluster: ClusterProcess, text: str) -> int:
    return sum(text in line for line in cluster.output)


async def test_a_stopped_worker_is_detected_by_its_ping_killed_and_replaced() -> None:
    with ClusterProcess("--worker-liveness-timeout", "2", workers=2) as cluster:
        hung, other = cluster.worker_pids()
        os.kill(hung, signal.SIGSTOP)  # the process exists; its loop answers nothing
        try:
            wait_until(lambda: cluster.supervisor_state()["workers"][0]["restarts"] == 1, timeout=30,
                       what="the supervisor to replace the stopped worker")
        finally:
            if not process_gone(hung):
                os.kill(hung, signal.SIGCONT)
        assert count(cluster, f"worker 0 (pid {hung}) did not answer the liveness ping") == 1, cluster.log()
        restart = cluster.supervisor_state()["recent_restarts"][-1]
        assert restart["worker"] == 0 and restart["exit"] == -signal.SIGKILL
        assert "liveness ping" in restart["reason"]
        wait_until(lambda: cluster.supervisor_state()["workers"][0]["ready"], timeout=30,
                   what="the replacement to serve")
        assert process_gone(hung)
        state = cluster.supervisor_state()["workers"]
        assert state[0]["pid"] not in (0, hung) and state[1]["pid"] == other and state[1]["restarts"] == 0
        # the replacement answers its pings: it stays, and the node serves
        client = await DerpClient.connect(cluster.url, PrivateKey.generate(), timeout=10)
        await client.close()
        await await_until(lambda: cluster.varz(0)["pid"] == state[0]["pid"], timeout=10,
                          what="the replacement's admin socket to answer")
        assert cluster.supervisor_state()["workers"][0]["restarts"] == 1


def test_sigterm_with_a_worker_that_ignores_it_ends_at_the_shutdown_budget() -> None:
    budget = 3.0
    cluster = ClusterProcess("--shutdown-timeout", str(budget), workers=2).start()
    try:
        deaf, other = cluster.worker_pids()
        os.kill(deaf, signal.SIGSTOP)  # a stopped process never acts on its SIGTERM
        assert cluster.proc is not None
        cluster.proc.send_signal(signal.SIGTERM)
        code = cluster.wait(timeout=budget + 30)
        assert code == 1, cluster.log()  # forced: as before, a kill is not a clean stop
        assert count(cluster, f"workers did not stop within the {budget:g}s shutdown budget; killing them") == 1
        assert cluster.output[-1] == "stopped (forced)", cluster.log()
        assert process_gone(deaf) and process_gone(other)
    finally:
        cluster.stop()
        cluster.tmp.cleanup()


@pytest.mark.parametrize(("setting", "flags", "key"), [
    ("rate_config", ["--rate-config", "{file}"], "limits.rate_config (--rate-config)"),
    ("mesh_key_file", ["--mesh-key-file", "{file}"], "server.mesh_key_file (--mesh-key-file / -mesh-psk-file)"),
    ("mesh_with", ["--mesh-with", "https://derper.example/derp"], "server.mesh_with (--mesh-with)"),
])
def test_a_setting_a_worker_would_refuse_exits_2_from_the_supervisor_with_one_line(
        tmp_path: Path, setting: str, flags: list[str], key: str) -> None:
    bad = tmp_path / "bad"
    bad.write_text('{"PerClientRateLimitBytesPerSec": -5}' if setting == "rate_config" else "not hex\n")
    cluster = ClusterProcess(*(flag.format(file=bad) for flag in flags))
    try:
        result = subprocess.run(cluster.command(), capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stdout + result.stderr
        assert len(lines) == 1 and lines[0].startswith(f"cluster: config error: {key}: "), result.stderr
        assert "worker" not in result.stdout  # refused before any worker started
        assert not list(cluster.run_dir.glob("worker-*.sock"))
    finally:
        cluster.tmp.cleanup()


def test_a_burst_of_signals_is_handled_once_each(tmp_path: Path) -> None:
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"PerClientRateLimitBytesPerSec": 1_000_000, "PerClientRateBurstBytes": 2_000_000}))
    cluster = ClusterProcess("--rate-config", str(rates), workers=1).start()
    try:
        applied = "rate config applied"  # the worker's line, once at start and once per SIGHUP it gets
        wait_until(lambda: count(cluster, applied) == 1, timeout=10, what="the worker's first rate config line")
        assert cluster.proc is not None
        cluster.proc.send_signal(signal.SIGHUP)
        cluster.proc.send_signal(signal.SIGTERM)  # a different signal, so the kernel cannot merge the two
        code = cluster.wait(timeout=60)
        assert code == 0, cluster.log()
        assert count(cluster, "SIGHUP: workers reload") == 1, cluster.log()
        assert count(cluster, "SIGTERM: draining the workers") == 1, cluster.log()
        assert count(cluster, "again: killing") == 0 and cluster.output[-1] == "stopped", cluster.log()
        assert count(cluster, applied) == 2, cluster.log()  # the reload reached the worker, once
    finally:
        cluster.stop()
        cluster.tmp.cleanup()
