"""Admission and rate limits through a real `cluster up` on loopback (separate worker processes).

The verifier stand-ins (tailscaled's LocalAPI on a unix socket, an admission URL on 127.0.0.1) run in
the test's event loop; the cluster's workers talk to them across processes.

Also a benchmark (not a test): `python -m tests.process.test_admission_cluster bench` measures the handshake
rate of one worker with verification on, cache cold and warm (figures in docs/ADMISSION.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay_worker import frames as F
from relay_worker.client import DerpClient, RecvPacket
from relay_worker.keys import PrivateKey
from tests.process.test_admission import (
    FakeLocalAPI,
    FakeVerifyURL,
    _http_get,
    connect_burst,
    connect_expect_refused,
    handshake_with_early_packet,
    held_rate,
    round_trip,
)
from tests.support import ClusterProcess, await_until, free_port

pytestmark = pytest.mark.slow



@contextlib.asynccontextmanager
async def cluster_up(*args: str, env: dict[str, str] | None = None, workers: int = 1) -> AsyncIterator[ClusterProcess]:
    cluster = ClusterProcess(*args, workers=workers, env=env)
    # start() blocks while it waits for the workers; keep the loop (and the stand-ins) running meanwhile
    await asyncio.to_thread(cluster.start)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)
        cluster.tmp.cleanup()


@pytest.fixture
def sock_dir() -> Any:
    with tempfile.TemporaryDirectory(prefix="admc-") as name:  # short: unix socket paths max ~107 bytes
        yield Path(name)


def worker_doc(cluster: ClusterProcess) -> dict[str, Any]:
    return cluster.varz(0)


async def wait_log(cluster: ClusterProcess, text: str, timeout: float = 10.0) -> None:
    await await_until(lambda: any(text in line for line in cluster.output), timeout=timeout,
                      what=f"log line containing {text!r}")


# -- tailscaled LocalAPI --------------------------------------------------------------------------------


async def test_verify_clients_admits_tailnet_nodes_and_refuses_strangers(sock_dir: Path) -> None:
    a_key, b_key, stranger = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    api = await FakeLocalAPI(sock_dir / "tailscaled.sock", {a_key.public().raw, b_key.public().raw}).start()
    try:
        async with cluster_up("--verify-clients", "--tailscaled-socket", str(api.path)) as cluster:
            a = await DerpClient.connect(cluster.url, a_key)
            b = await DerpClient.connect(cluster.url, b_key)
            try:
                await round_trip(a, b, b"members relay")
                frames = await handshake_with_early_packet(cluster.port, stranger, b.public_key, b"smuggled")
                assert [t for t, _ in frames] == [F.SERVER_KEY]
                await a.send(b.public_key, b"marker")
                assert await b.recv_packet(5) == RecvPacket(a.public_key, b"marker")
            finally:
                await a.close()
                await b.close()
            assert worker_doc(cluster)["worker"]["refused_clients"] == 1
            await wait_log(cluster, f"refused: nodekey:{stranger.public().raw.hex()} not found in local tailscaled")
        assert api.requests and api.requests[0].headers["host"] == "local-tailscaled.sock"
    finally:
        await api.close()


def test_verify_clients_socket_missing_is_a_start_error(sock_dir: Path) -> None:
    """Noticed at start (one line, exit 2), not as a refusal of every connection."""
    missing = sock_dir / "tailscaled.sock"
    # a real port: the preflight refuses port 0 (workers share the port) before it looks at admission
    result = subprocess.run([sys.executable, "-m", "cluster", "up", "--no-stun", "--listen", f"127.0.0.1:{free_port()}",
                             "--state-dir", str(sock_dir / "state"), "--verify-clients", "--tailscaled-socket",
                             str(missing)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "admission.tailscaled_socket" in line and str(missing) in line and "start tailscaled" in line


async def test_verify_clients_socket_not_answering_refuses_with_clear_log(sock_dir: Path) -> None:
    dead = sock_dir / "tailscaled.sock"
    holder = socket.socket(socket.AF_UNIX)  # the socket file exists, nobody accepts on it
    holder.bind(str(dead))
    key = PrivateKey.generate()
    try:
        async with cluster_up("--verify-clients", "--tailscaled-socket", str(dead)) as cluster:
            await connect_expect_refused(cluster.url, key)
            await wait_log(cluster, f"tailscaled LocalAPI socket {dead} refuses connections (is tailscaled "
                                    f"running?): refusing nodekey:{key.public().raw.hex()}")
            assert worker_doc(cluster)["worker"]["refused_clients"] == 1
    finally:
        holder.close()


# -- verify URL ----------------------------------------------------------------------------------------


async def test_verify_url_allow_deny_and_unreachable_fail_closed() -> None:
    allowed, denied, later = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    verifier = await FakeVerifyURL(answers={denied.public().raw: (200, b'{"Allow":false}', 0.0)}).start()
    async with cluster_up("--verify-client-url", verifier.url, "--no-verify-client-url-fail-open",
                          "--admission-timeout", "1") as cluster:
        client = await DerpClient.connect(cluster.url, allowed)
        await client.close()
        await connect_expect_refused(cluster.url, denied)
        await verifier.close()  # now unreachable: fail closed
        await connect_expect_refused(cluster.url, later)
        await wait_log(cluster, "unreachable")
    assert {r.headers["content-type"] for r in verifier.requests} == {"application/json"}


async def test_verify_url_env_form_fail_open() -> None:
    """The docker-compose form: DERP_VERIFY_CLIENT_URL + DERP_VERIFY_CLIENT_URL_FAIL_OPEN. Fail-open
    admits only when the controller is unreachable; a 503 answer is a refusal, as in derper."""
    verifier = await FakeVerifyURL(default=(503, b"down", 0.0)).start()
    env = {"DERP_VERIFY_CLIENT_URL": verifier.url, "DERP_VERIFY_CLIENT_URL_FAIL_OPEN": "true"}
    try:
        async with cluster_up(env=env) as cluster:
            await connect_expect_refused(cluster.url, PrivateKey.generate())
            await verifier.close()  # now unreachable: fail-open admits
            client = await DerpClient.connect(cluster.url)
            await client.close()
            await wait_log(cluster, "(fail-open)")
        assert len(verifier.requests) == 1
    finally:
        await verifier.close()


async def test_slow_verifier_does_not_delay_relaying_in_the_worker() -> None:
    a_key, b_key, slow_key = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    verifier = await FakeVerifyURL(answers={slow_key.public().raw: (200, b'{"Allow":true}', 5.0)}).start()
    try:
        async with cluster_up("--verify-client-url", verifier.url, "--admission-timeout", "10") as cluster:
            a = await DerpClient.connect(cluster.url, a_key)
            b = await DerpClient.connect(cluster.url, b_key)
            try:
                slow = asyncio.create_task(DerpClient.connect(cluster.url, slow_key, timeout=20))
                await asyncio.wait_for(verifier.event(slow_key.public().raw).wait(), 5)
                for i in range(50):
                    await round_trip(a, b, b"rt %d" % i)
                other = await DerpClient.connect(cluster.url)  # a fresh key, answered at once
                await other.close()
                assert slow_key.public().raw not in verifier.answered
                late = await asyncio.wait_for(slow, 15)
                await round_trip(late, a, b"admitted after 5 s")
                await late.close()
            finally:
                await a.close()
                await b.close()
    finally:
        await verifier.close()


# -- allow-keys file -----------------------------------------------------------------------------------


async def test_allow_keys_file_reloads_when_it_changes(tmp_path: Path) -> None:
    first, second = PrivateKey.generate(), PrivateKey.generate()
    path = tmp_path / "allowed-keys"
    path.write_text(f"# tailnet nodes\nnodekey:{first.public().raw.hex()}\n")
    async with cluster_up(env={"DERP_ALLOW_KEYS_FILE": str(path)}) as cluster:
        client = await DerpClient.connect(cluster.url, first)
        await client.close()
        await connect_expect_refused(cluster.url, second)
        path.write_text(path.read_text() + f"nodekey:{second.public().raw.hex()}\n")
        deadline = time.monotonic() + 10
        while True:
            try:
                client = await DerpClient.connect(cluster.url, second)
                await client.close()
                break
            except Exception:
                assert time.monotonic() < deadline, "the changed allow-keys file was never reloaded"
                await asyncio.sleep(0.2)


async def test_sighup_reloads_the_allow_keys_file_and_keeps_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "allowed-keys"
    path.write_text(f"nodekey:{PrivateKey.generate().public().raw.hex()}\n")
    async with cluster_up("--allow-keys-file", str(path)) as cluster:
        pid = cluster.worker_pids()[0]
        loads = f"allow-keys file {path}: 1 keys"
        await wait_log(cluster, loads)
        before = sum(loads in line for line in cluster.output)
        os.kill(pid, signal.SIGHUP)  # without a handler SIGHUP would end the worker
        await await_until(lambda: sum(loads in line for line in cluster.output) > before, timeout=10,
                          what="a reload logged after SIGHUP")
        assert cluster.worker_pids() == [pid]
        await connect_expect_refused(cluster.url)  # a key not in the file, still refused by the same worker


# -- rate limits ---------------------------------------------------------------------------------------


RATE, BURST = 1_000_000, 200_000


async def test_server_info_never_announces_the_token_bucket() -> None:
    # derper sends ServerInfo{Version: 2} only; Go clients given a bucket drop their own packets (D1)
    async with cluster_up("--client-bytes-per-second", str(RATE), "--client-bytes-burst", str(BURST)) as cluster:
        client = await DerpClient.connect(cluster.url)
        prober = await DerpClient.connect(cluster.url, is_prober=True)
        try:
            assert client.server_info is not None
            assert client.server_info.token_bucket_bytes_per_second == 0
            assert client.server_info.token_bucket_bytes_burst == 0
            assert prober.server_info is not None and prober.server_info.token_bucket_bytes_per_second == 0
        finally:
            await client.close()
            await prober.close()


async def test_client_over_its_rate_is_held_to_it_and_others_are_unaffected() -> None:
    async with cluster_up("--client-bytes-per-second", str(RATE), "--client-bytes-burst", str(BURST)) as cluster:
        a, b, c, d = [await DerpClient.connect(cluster.url) for _ in range(4)]
        try:
            rate = await held_rate(a, b, c, d)
        finally:
            for client in (a, b, c, d):
                await client.close()
        assert 0.7 * RATE <= rate <= 1.3 * RATE, f"relayed {rate:.0f} B/s for a {RATE} B/s client"


async def test_accept_burst_beyond_the_limit_is_refused_quickly() -> None:
    async with cluster_up("--accept-connection-limit", "1", "--accept-connection-burst", "5") as cluster:
        served, refused, refill = await connect_burst(cluster.port, 20)
        assert 5 <= len(served) <= 5 + refill, (served, refused)
        assert max(refused) < 2.0, "refusals are an immediate abort, not a hang"
        # the admin unix socket is exempt, so the operator still sees the counter
        assert worker_doc(cluster)["worker"]["accept_rate_limited"] == len(refused)
        deadline = time.monotonic() + 5
        while not (await connect_burst(cluster.port, 1))[0]:
            assert time.monotonic() < deadline, "never served again after the burst"
            await asyncio.sleep(0.2)


# -- admin surfaces ------------------------------------------------------------------------------------


async def test_admin_varz_answers_loopback_and_refuses_a_forwarded_outsider() -> None:
    async with cluster_up() as cluster:
        answer = await _http_get(cluster.port, "/debug/varz")
        assert answer.startswith(b"HTTP/1.1 200")
        assert (await _http_get(cluster.port, "/metrics")).startswith(b"HTTP/1.1 200")
        forwarded = await _http_get(cluster.port, "/debug/varz", "X-Forwarded-For: 203.0.113.5\r\n")
        assert forwarded.startswith(b"HTTP/1.1 403")


# -- benchmark: handshake rate with verification on ----------------------------------------------------


async def _handshakes(url: str, keys: list[PrivateKey], concurrency: int) -> tuple[float, list[float]]:
    """Connect (full handshake up to ServerInfo) and close once per key; returns (handshakes/s, latencies)."""
    queue = list(keys)
    latencies: list[float] = []

    async def runner() -> None:
        while queue:
            key = queue.pop()
            started = time.monotonic()
            client = await DerpClient.connect(url, key, timeout=30)
            latencies.append(time.monotonic() - started)
            await client.close()

    started = time.monotonic()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    return len(keys) / (time.monotonic() - started), latencies


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve_localapi(path: str, keys: list[bytes], delay: float, calls: Any, ready: Any) -> None:
    """The stand-in LocalAPI in its own process, so it does not share the load generator's loop."""

    async def run() -> None:
        api = FakeLocalAPI(Path(path), set(keys), delay=delay)
        handle = api._handle

        async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with calls.get_lock():
                calls.value += 1
            await handle(reader, writer)

        api._handle = counted  # type: ignore[method-assign]
        await api.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(run())


async def bench(count: int, concurrency: int, delay: float) -> None:
    import multiprocessing

    keys = [PrivateKey.generate() for _ in range(count)]
    warmup = [PrivateKey.generate() for _ in range(50)]
    spawn = multiprocessing.get_context("spawn")
    calls = spawn.Value("q", 0)
    ready = spawn.Event()
    rows = []
    with tempfile.TemporaryDirectory(prefix="admb-") as tmp:
        path = str(Path(tmp) / "tailscaled.sock")
        api = spawn.Process(target=_serve_localapi, daemon=True,
                            args=(path, [k.public().raw for k in keys + warmup], delay, calls, ready))
        api.start()
        try:
            assert await asyncio.to_thread(ready.wait, 30), "stand-in LocalAPI did not start"
            for label, args in (("no admission", ()),
                                ("verify-clients", ("--verify-clients", "--tailscaled-socket", path))):
                async with cluster_up(*args) as cluster:
                    pid = cluster.worker_pids()[0]
                    await _handshakes(cluster.url, warmup, 10)
                    phases = [("cold", keys), ("warm", keys)] if args else [("-", keys)]
                    for phase, phase_keys in phases:
                        before, cpu0 = calls.value, _cpu_seconds(pid)
                        rate, lat = await _handshakes(cluster.url, phase_keys, concurrency)
                        cpu = _cpu_seconds(pid) - cpu0
                        rows.append((label, phase, rate, statistics.median(lat) * 1000,
                                     sorted(lat)[int(len(lat) * 0.99) - 1] * 1000, cpu / len(phase_keys) * 1e6,
                                     calls.value - before))
        finally:
            api.kill()
            api.join(5)
    print(f"{count} handshakes per phase, {concurrency} concurrent, stand-in LocalAPI delay {delay * 1000:g} ms, "
          f"1 worker, {os.cpu_count()} CPUs")
    print(f"{'mode':<16}{'cache':<7}{'handshakes/s':>13}{'p50 ms':>9}{'p99 ms':>9}{'worker CPU us/hs':>18}"
          f"{'LocalAPI calls':>16}")
    for label, phase, rate, p50, p99, cpu_us, n_calls in rows:
        print(f"{label:<16}{phase:<7}{rate:>13.0f}{p50:>9.1f}{p99:>9.1f}{cpu_us:>18.0f}{n_calls:>16}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.process.test_admission_cluster")
    parser.add_argument("command", choices=["bench"])
    parser.add_argument("--count", type=int, default=2000, help="handshakes per phase")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--localapi-delay-ms", type=float, default=0.0,
                        help="extra latency of the stand-in LocalAPI per whois")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(bench(args.count, args.concurrency, args.localapi_delay_ms / 1000))
    sys.exit(0)


if __name__ == "__main__":
    main()
