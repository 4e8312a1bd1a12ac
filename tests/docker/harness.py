"""The container for real: a dockerd of the test's own, a Debian base made by debootstrap, a build
base on it with a C compiler, the image built from deploy/Dockerfile on the two, and
deploy/docker-compose.yml brought up with a test override.

Nothing here touches a Docker the machine may run: the daemon has its own data root (kept, so the
base image and the build cache survive between runs), exec root, pidfile and socket, no bridge and
no iptables rules. Image registries are out of reach, so the base image is made locally; the build
reaches PyPI through the host's network, and the container runs on host networking.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"

#: kept between runs: the daemon's images (the debootstrap base is built once) and its build cache
STATE = Path(os.environ.get("DERP_DOCKER_STATE", "/var/tmp/derp-docker-test"))
#: sockets and the pidfile: short paths (a unix socket path has ~107 bytes)
RUNDIR = Path("/run/derp-docker-test")
SOCKET = RUNDIR / "docker.sock"
PIDFILE = RUNDIR / "dockerd.pid"

BASE_IMAGE = "derp-test-base:bookworm"
IMAGE = "derp-cluster:test"
SUITE = "bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
#: the Dockerfile's build stage runs on BASE_IMAGE plus these, so the wheel carries the compiled relay
#: loop (relay_worker._fastpath); the runtime stage stays on BASE_IMAGE, without a compiler
BUILD_BASE_IMAGE = "derp-test-build-base:bookworm"
COMPILER_PACKAGES = "gcc libc6-dev python3-dev"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
INSTALL_HINT = "apt-get install -y docker.io debootstrap docker-compose"


class DockerUnavailable(Exception):
    """A tool the container test needs is missing; the message says which and how to install it."""


def _which(name: str, *fallbacks: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((path for path in fallbacks if os.access(path, os.X_OK)), None)


class Tools:
    """dockerd, a BuildKit-capable docker client, debootstrap and a compose (v2 plugin or v1)."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise DockerUnavailable("not root: the container test starts its own dockerd")
        dockerd = _which("dockerd", "/usr/sbin/dockerd", "/usr/bin/dockerd")
        # Debian's 20.10 client has BuildKit built in (DOCKER_BUILDKIT=1); a newer CLI needs buildx,
        # so take /usr/bin/docker (docker.io) before whatever `docker` comes first on PATH.
        docker = _which("/usr/bin/docker") or _which("docker")
        debootstrap = _which("debootstrap", "/usr/sbin/debootstrap")
        missing = [name for name, path in (("dockerd", dockerd), ("docker", docker), ("debootstrap", debootstrap))
                   if path is None]
        if missing:
            raise DockerUnavailable(f"{', '.join(missing)} not installed ({INSTALL_HINT})")
        assert dockerd and docker and debootstrap
        self.dockerd, self.docker, self.debootstrap = dockerd, docker, debootstrap
        self.compose_v2 = subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
        if self.compose_v2:
            self.compose = [docker, "compose"]
        else:
            v1 = _which("docker-compose")
            if v1 is None:
                raise DockerUnavailable(f"neither `docker compose` (v2) nor docker-compose (v1) installed "
                                        f"({INSTALL_HINT})")
            self.compose = [v1]


def remove_tree(path: Path) -> None:
    """rm -r a rootfs, first unmounting what debootstrap may have left in it (a failed run can leave
    /proc, /sys or a bind mount of the host's /dev there: rmtree would walk into those)."""
    root = str(path.resolve())
    mounts = [line.split()[1].replace("\\040", " ") for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m == root or m.startswith(root + "/")), reverse=True):
        subprocess.run(["umount", "--lazy", mount], capture_output=True)
    left = [m for m in Path("/proc/self/mounts").read_text().split() if m.startswith(root + "/")]
    if left:
        raise AssertionError(f"could not unmount {left} from {root}; not removing it")
    shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """dockerd on SOCKET, its state under STATE; one test run at a time (a lock file says so)."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock: Any = None
        self.log_path = STATE / "dockerd.log"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}", "DOCKER_BUILDKIT": "1",
                "DOCKER_CONFIG": str(STATE / "client"), **(extra or {})}

    def docker(self, *args: str, check: bool = True, timeout: float = 120.0, input: bytes | None = None,
               stdin: Any = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.tools.docker, *args], capture_output=True, timeout=timeout, env=self.env(),
                              input=input, stdin=stdin)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                             proc.stderr.decode(errors="replace"))
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                 f"{result.stderr[-3000:]}")
        return result

    def _stop_leftover(self) -> None:
        # A run killed before its teardown leaves its dockerd behind: it is ours (our pidfile, our socket).
        with contextlib.suppress(OSError, ValueError):
            pid = int(PIDFILE.read_text().strip())
            if Path(f"/proc/{pid}/exe").resolve().name == "dockerd":
                os.kill(pid, signal.SIGTERM)
                for _ in range(300):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.1)

    def __enter__(self) -> Daemon:
        STATE.mkdir(parents=True, exist_ok=True)
        RUNDIR.mkdir(parents=True, exist_ok=True)
        self._lock = (STATE / "lock").open("w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # another run of this test: wait for it
        self._stop_leftover()
        argv = [self.tools.dockerd, "--data-root", str(STATE / "data"), "--exec-root", str(RUNDIR / "exec"),
                "--pidfile", str(PIDFILE), "-H", f"unix://{SOCKET}", "--bridge=none", "--iptables=false",
                "--ip6tables=false", "--ip-masq=false"]
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while self.docker("version", check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.__exit__()
                raise AssertionError(f"dockerd did not come up:\n{tail}")
            time.sleep(0.2)
        # what a run killed before its teardown left in this daemon (never anything outside it)
        self.docker("container", "prune", "--force", check=False)
        self.docker("volume", "prune", "--force", check=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # dockerd stops its containers and its containerd
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # dockerd leaves its bind mount of the host's network namespace behind: not a thing to keep
        netns = RUNDIR / "exec" / "netns" / "default"
        if os.path.ismount(netns):
            subprocess.run(["umount", str(netns)], capture_output=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def image_exists(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def ensure_base_image(self) -> str:
        """The Debian base: debootstrap once, `docker import` it; later runs reuse the tagged image."""
        if self.image_exists(BASE_IMAGE):
            return "cached"
        rootfs = STATE / "rootfs"
        remove_tree(rootfs)
        try:
            proc = subprocess.run([self.tools.debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE,
                                   str(rootfs)], capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise AssertionError(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                                     f"{proc.stderr[-2000:]}")
            # Trust what this host trusts: where PyPI is reached through a TLS-inspecting proxy, the
            # build's pip needs the host's CA bundle (Debian's pip reads this file, not certifi's).
            host_bundle = Path(os.environ.get("SSL_CERT_FILE") or HOST_CA_BUNDLE)
            if host_bundle.is_file():
                shutil.copyfile(host_bundle, rootfs / HOST_CA_BUNDLE.relative_to("/"))
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            try:
                self.docker("import", "--change", f"ENV PATH={DEFAULT_PATH}", "--change", 'CMD ["/bin/bash"]',
                            "-", BASE_IMAGE, stdin=tar.stdout, timeout=300)
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait(60)
        finally:
            remove_tree(rootfs)
        return "built"

    def build_build_base_image(self) -> None:
        """BASE_IMAGE plus COMPILER_PACKAGES from Debian's mirror (the one debootstrap wrote into the
        base's sources.list). Built every run: the build cache makes that a no-op until BASE_IMAGE
        changes, and then it follows BASE_IMAGE, whose Python the compiled extension must match."""
        dockerfile = (f"FROM {BASE_IMAGE}\n"
                      "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y"
                      f" --no-install-recommends {COMPILER_PACKAGES} && rm -rf /var/lib/apt/lists/*\n")
        self.docker("build", "--network", "host", "-t", BUILD_BASE_IMAGE, "-", input=dockerfile.encode(), timeout=900)

    def build_image(self) -> None:
        """deploy/Dockerfile on the Debian bases, with BuildKit; --network host so pip reaches PyPI."""
        self.docker("build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}", "--build-arg",
                    f"BUILD_BASE={BUILD_BASE_IMAGE}", "-f", str(REPO / "deploy" / "Dockerfile"), "-t", IMAGE,
                    str(REPO), timeout=900)
        self.docker("image", "prune", "--force", check=False)  # the previous build, now untagged


class Compose:
    """deploy/docker-compose.yml plus a test override, as one project of this daemon."""

    def __init__(self, daemon: Daemon, workdir: Path, override: dict[str, Any], env: dict[str, str],
                 project: str) -> None:
        self.daemon = daemon
        self.workdir = workdir
        self.project = project
        self.override = workdir / "docker-compose.test.yml"
        self.override.write_text(yaml.safe_dump(override, sort_keys=False))
        self.env = env
        self.rendered = workdir / "docker-compose.rendered.yml"

    def run(self, *args: str, files: Sequence[Path], check: bool = True, timeout: float = 180.0
            ) -> subprocess.CompletedProcess[str]:
        argv = [*self.daemon.tools.compose, "--project-name", self.project]
        for path in files:
            argv += ["-f", str(path)]
        # --project-directory: relative paths of the file (its build context) stay relative to deploy/
        argv += ["--project-directory", str(COMPOSE_FILE.parent), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.daemon.env(self.env))
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def render(self) -> dict[str, Any]:
        """The file and the override merged by compose itself, minus what host networking forbids.

        On the host's network the kernel refuses net.* sysctls for a container (runc: "not allowed
        in host network namespace") and published ports mean nothing, and Compose v1 cannot remove
        a key in an override (v2's !reset is not in v1), so the merged config drops those two."""
        merged = yaml.safe_load(self.run("config", files=[COMPOSE_FILE, self.override]).stdout)
        for service in merged["services"].values():
            service.pop("sysctls", None)
            service.pop("ports", None)
        self.rendered.write_text(yaml.safe_dump(merged, sort_keys=False))
        return dict(merged)

    def up(self, timeout: float = 120.0) -> str:
        """Start it and wait until Docker calls it healthy (the image's HEALTHCHECK relays a packet)."""
        args = ["up", "--detach", "--no-build"]
        if self.daemon.tools.compose_v2:
            args += ["--wait"]
        self.run(*args, files=[self.rendered], timeout=timeout)
        container = self.run("ps", "-q", "derp", files=[self.rendered]).stdout.strip()
        assert container, "compose started no derp container"
        deadline = time.monotonic() + timeout
        while True:
            state = json.loads(self.daemon.docker("inspect", "--format", "{{json .State}}", container).stdout)
            health = (state.get("Health") or {}).get("Status")
            if health == "healthy":
                return container
            if not state.get("Running") or health == "unhealthy" or time.monotonic() > deadline:
                logs = self.daemon.docker("logs", "--tail", "80", container, check=False)
                raise AssertionError(f"container not healthy ({state.get('Status')}, health {health}):\n"
                                     f"{json.dumps(state.get('Health'), indent=1)[-3000:]}\n"
                                     f"{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
            time.sleep(0.5)

    def down(self) -> None:
        if self.rendered.exists():
            self.run("down", "--volumes", "--timeout", "30", files=[self.rendered], check=False, timeout=120)


@contextlib.contextmanager
def root_veth(netns: str, root_addr: str, ns_addr: str, prefix: int = 24) -> Iterator[None]:
    """A veth pair from the root namespace into NETNS: the way in to a container on host networking."""
    outside = f"dkr{os.getpid() % 100000}r"
    inside = f"dkr{os.getpid() % 100000}n"
    steps = [
        ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", netns],
        ["ip", "addr", "add", f"{root_addr}/{prefix}", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "-n", netns, "addr", "add", f"{ns_addr}/{prefix}", "dev", inside],
        ["ip", "-n", netns, "link", "set", inside, "up"],
    ]
    try:
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode != 0:
                raise AssertionError(f"{' '.join(step)}: {proc.stderr.strip()}")
        yield
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
