"""The image and the compose file for real: built, started, healthy, probed and relaying.

One container for the module, made from deploy/Dockerfile on a debootstrap'd Debian base (its build
stage on that base plus a C compiler, so the image runs the compiled relay loop) and started by
Compose from deploy/docker-compose.yml with an override: host networking (the test's dockerd has no
bridge), free ports, a trustme cert as <domain>.crt/.key in the certs volume,
admission off, two workers and CPU/memory limits. Then `cluster probe` checks it from the host by
its IPv4 and from a network namespace by name, and two pairs of Tailscale's tsnet nodes relay
through it from that namespace, which reaches the host's addresses over a veth of documentation
addresses. Missing tools skip the module, or fail it under CI=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.docker.harness import BUILD_BASE_IMAGE, IMAGE, Compose, Daemon, DockerUnavailable, Tools, root_veth
from tests.interop.harness import Control, InteropUnavailable, NetNS, build_binaries, tsnet_pairs
from tests.support import free_port

DOMAIN = "derp-docker.test"
#: the veth into the test namespace: the root side is where the namespace finds the container
ROOT_ADDR, NS_ADDR = "198.51.100.1", "198.51.100.2"
REGION = 900
NOFILE = min(1048576, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def unavailable(what: str, exc: Exception | None) -> None:
    """Skip, or fail under CI=true, with one line; called outside `except` so no traceback chain shows."""
    if exc is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}: {exc}", pytrace=False)
    pytest.skip(f"{what}: {exc}")


def log(message: str) -> None:
    print(f"[docker tier] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    tools, problem = None, None
    try:
        tools = Tools()
    except DockerUnavailable as exc:
        problem = exc
    unavailable("container tier", problem)
    assert tools is not None
    started = time.monotonic()
    with Daemon(tools) as running:
        log(f"dockerd up in {time.monotonic() - started:.1f}s; compose {' '.join(tools.compose)}")
        started = time.monotonic()
        how = running.ensure_base_image()
        log(f"base image {how} in {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        running.build_build_base_image()
        log(f"build base image {BUILD_BASE_IMAGE} ready in {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        running.build_image()
        log(f"image {IMAGE} built in {time.monotonic() - started:.1f}s")
        yield running


@dataclass
class Node:
    container: str
    derp_port: int
    http_port: int
    stun_port: int
    ca_file: Path
    workdir: Path
    compose: Compose

    def derp_map(self, ipv4: str) -> dict[str, Any]:
        """What `cluster derpmap` says for the container's settings, pinned to IPV4 (no DNS)."""
        proc = subprocess.run([sys.executable, "-m", "cluster", "derpmap", "--hostname", DOMAIN,
                               "--listen", f":{self.derp_port}", "--stun", f":{self.stun_port}",
                               "--certmode", "manual", "--certdir", str(self.workdir / "certs"),
                               "--http-port", str(self.http_port), "--no-verify-clients"],
                              capture_output=True, text=True, timeout=60, check=True)
        doc: dict[str, Any] = json.loads(proc.stdout)
        (node,) = doc["Regions"][str(REGION)]["Nodes"]
        node["IPv4"] = ipv4
        return doc


def cert_volume(workdir: Path, ca: trustme.CA) -> Path:
    """<domain>.crt/.key, readable by the image's uid 10001 (a test key: no secret)."""
    certs = workdir / "certs"
    certs.mkdir()
    cert = ca.issue_cert(DOMAIN)
    cert.private_key_pem.write_to_path(certs / f"{DOMAIN}.key")
    (certs / f"{DOMAIN}.crt").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    for path in (workdir, certs):
        path.chmod(0o755)
    for path in certs.iterdir():
        path.chmod(0o644)
    return certs


@pytest.fixture(scope="module")
def node(daemon: Daemon) -> Iterator[Node]:
    workdir = Path(tempfile.mkdtemp(prefix="derp-docker-"))
    ca = trustme.CA()
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    certs = cert_volume(workdir, ca)
    (workdir / "tailscale").mkdir()  # stands in for the host's tailscaled socket dir: admission is off
    derp_port, http_port, stun_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    # The variables go in through the shell, as a .env file would set them for the compose file.
    env = {"DERP_DOMAIN": DOMAIN, "DERP_ADDR": f":{derp_port}", "DERP_HTTP_PORT": str(http_port),
           "DERP_STUN_PORT": str(stun_port), "DERP_VERIFY_CLIENTS": "false", "DERP_WORKERS": "2"}
    override = {"services": {"derp": {
        "image": IMAGE,
        "network_mode": "host",
        # same container paths as the file's, so these replace its ./certs and /var/run/tailscale
        "volumes": [f"{certs}:/var/lib/derper/certs:ro", f"{workdir / 'tailscale'}:/var/run/tailscale"],
        # the image's own check (a relayed packet), polled faster than its 30 s for the test
        "healthcheck": {"interval": "2s", "timeout": "5s", "start_period": "60s", "retries": 3},
        "cpus": 1.0,
        "mem_limit": "512m",
        "pids_limit": 256,
        "restart": "no",
        # the file asks for 1048576 open files; no container gets more than its runtime's hard limit,
        # and where that is lower (a sandbox without CAP_SYS_RESOURCE) runc refuses to start it
        "ulimits": {"nofile": {"soft": NOFILE, "hard": NOFILE}},
    }}}
    compose = Compose(daemon, workdir, override, env, project=f"derptest{os.getpid()}")
    try:
        compose.render()
        started = time.monotonic()
        container = compose.up()
        log(f"container {container[:12]} healthy in {time.monotonic() - started:.1f}s")
        yield Node(container, derp_port, http_port, stun_port, ca_file, workdir, compose)
    finally:
        compose.down()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def ns(node: Node) -> Iterator[NetNS]:
    """A namespace of the test's own where DOMAIN names the root side of a veth into it."""
    with contextlib.ExitStack() as stack:
        namespace, problem = None, None
        try:
            namespace = stack.enter_context(NetNS(node.workdir, hosts={DOMAIN: ROOT_ADDR}))
        except InteropUnavailable as exc:
            problem = exc
        unavailable("container tier", problem)
        assert namespace is not None
        stack.enter_context(root_veth(namespace.name, ROOT_ADDR, NS_ADDR))
        yield namespace


def test_image_alone_refuses_to_start_without_a_domain(daemon: Daemon) -> None:
    # first in the module, before the compose node exists: `docker run IMAGE` with nothing set is
    # derper's letsencrypt default, which needs a name; it must not fall back to plain HTTP
    result = daemon.docker("run", "--rm", "--network", "none", IMAGE, check=False, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "cluster: config error: server.hostname (--hostname / -hostname / DERP_DOMAIN): certmode letsencrypt "
        "needs the DNS name to get a certificate for"], result.stderr


def test_image_runs_the_compiled_relay_loop(daemon: Daemon) -> None:
    # The wheel builds without relay_worker._fastpath where the build stage has no C compiler, and
    # the node then quietly runs the pure-Python loop at twice the CPU per packet: the image must not.
    probe = ("import shutil; from relay_worker import fastpath; "
             "print(fastpath.available(), [cc for cc in ('cc', 'gcc') if shutil.which(cc)])")
    result = daemon.docker("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c", probe,
                           timeout=120)
    # ... and the compiler stayed in the build stage
    assert result.stdout.split() == ["True", "[]"], result.stdout + result.stderr


def test_container_runs_the_image_as_built(daemon: Daemon, node: Node) -> None:
    inspect = json.loads(daemon.docker("inspect", node.container).stdout)[0]
    assert inspect["Config"]["Image"] == IMAGE
    assert inspect["Config"]["User"] == "10001:10001"
    assert inspect["Config"]["Entrypoint"] == ["cluster", "up"]
    assert inspect["HostConfig"]["NetworkMode"] == "host"
    assert inspect["HostConfig"]["NanoCpus"] == 10**9 and inspect["HostConfig"]["Memory"] == 512 << 20
    assert {"Name": "nofile", "Soft": NOFILE, "Hard": NOFILE} in inspect["HostConfig"]["Ulimits"]
    health = inspect["State"]["Health"]
    assert health["Status"] == "healthy" and health["Log"][-1]["ExitCode"] == 0, health
    # the node runs from the image's venv, as the non-root user, with the compose file's settings
    ps = daemon.docker("exec", node.container, "python", "-c",
                       "import os, sys; print(os.getuid(), sys.prefix, os.environ['DERP_CERT_MODE'])").stdout.split()
    assert ps == ["10001", "/opt/derp", "manual"]
    # and a second healthcheck run by hand passes too
    daemon.docker("exec", node.container, "python", "-m", "cluster.healthcheck", "--quiet")


def test_probe_from_the_host(node: Node) -> None:
    derp_map = node.workdir / "derpmap-loopback.json"
    derp_map.write_text(json.dumps(node.derp_map("127.0.0.1")))
    proc = subprocess.run([sys.executable, "-m", "cluster", "probe", "--derpmap", str(derp_map), "--ca-file",
                           str(node.ca_file), "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log(f"probe --derpmap (127.0.0.1): {proc.stdout.strip()[:600]}")


def test_probe_by_name_from_a_namespace(node: Node, ns: NetNS) -> None:
    url = f"https://{DOMAIN}:{node.derp_port}/derp"
    proc = ns.run([sys.executable, "-m", "cluster", "probe", url, "--ca-file", node.ca_file,
                   "--stun-port", str(node.stun_port)], check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log(f"probe {url}:\n{proc.stdout.strip()}")


def test_tailscale_nodes_relay_through_the_container(node: Node, ns: NetNS) -> None:
    bins, problem = None, None
    try:
        bins = build_binaries()
    except InteropUnavailable as exc:
        problem = exc
    unavailable("Tailscale's programs", problem)
    assert bins is not None
    control = Control(ns, bins, node.derp_map(ROOT_ADDR))
    results = tsnet_pairs(ns, bins, control, pairs=2, size=1 << 20, env={"SSL_CERT_FILE": str(node.ca_file)},
                          timeout=120)
    for result in results:
        assert result["derp_region"] == REGION, result
        assert result["endpoint"] == "", f"went direct, not through DERP: {result}"
        assert result["bytes"] >= 1 << 20


def test_sigterm_stops_the_node_within_its_grace_period(daemon: Daemon, node: Node) -> None:
    # last in the module: it stops the shared container. `compose stop` sends SIGTERM and allows
    # the file's stop_grace_period; the supervisor drains its workers and exits 0, before SIGKILL.
    started = time.monotonic()
    node.compose.run("stop", files=[node.compose.rendered], timeout=90)
    took = time.monotonic() - started
    state = json.loads(daemon.docker("inspect", "--format", "{{json .State}}", node.container).stdout)
    assert not state["Running"] and state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert took < 30, f"stop took {took:.1f}s: the grace period ran out"
