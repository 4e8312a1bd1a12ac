"""Tailscale's own programs against our cluster: building them, and a network namespace to run them in.

Every Tailscale program runs inside a namespace the test creates: loopback plus a veth pair with
documentation addresses (tailscaled pauses its control client while it sees no non-loopback
address), and no route anywhere else, so nothing they try can leave the machine. Our cluster runs
in the same namespace. The binaries come from tailscale.com at the version pinned in go.mod,
built by `go build` into tests/interop/bin (the Go build cache makes later builds seconds).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support import ClusterProcess, wait_until

HERE = Path(__file__).resolve().parent
BIN = HERE / "bin"
WS_BIN = BIN / "ws"
TAILSCALE_MODULE = "tailscale.com"
TAILSCALE_TOOLS = ("tailscaled", "tailscale", "derper", "derpprobe")
OUR_TOOLS = ("tscontrol", "tsnetpair", "derpclients", "derpload", "derpconns")

#: what every Tailscale program gets: no log uploads, no support traffic
BASE_ENV = {"TS_NO_LOGS_NO_SUPPORT": "true", "TS_LOGS_DIR": "", "TS_DISABLE_UPNP": "true"}


class InteropUnavailable(Exception):
    """Go, or the pinned module graph, is not available here; the message says which."""


def pinned_version() -> str:
    for line in (HERE / "go.mod").read_text().splitlines():
        parts = line.removeprefix("require").split()
        if len(parts) == 2 and parts[0] == TAILSCALE_MODULE:
            return parts[1]
    raise InteropUnavailable(f"tests/interop/go.mod does not require {TAILSCALE_MODULE}")


def _go_build(out: Path, packages: Sequence[str], tags: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["go", "build", "-o", str(out) + "/"]
    if tags:
        cmd += ["-tags", tags]
    env = dict(os.environ, GOFLAGS="-mod=readonly")
    proc = subprocess.run([*cmd, *packages], cwd=HERE, env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise InteropUnavailable(f"go build of {' '.join(packages)} failed: {tail}")


def build_binaries() -> Path:
    """Build Tailscale's programs (go.mod's tool lines) and ours; return the bin directory."""
    if shutil.which("go") is None:
        raise InteropUnavailable("Go is not installed (the interop tier builds Tailscale's programs with it)")
    pinned_version()
    _go_build(BIN, ["tool", "./cmd/..."])
    # The real DERP client over WebSocket: derphttp compiles it in only with this tag.
    _go_build(WS_BIN, ["./cmd/tsnetpair", "./cmd/derpclients", "./cmd/derpload"], tags="ts_debug_websockets")
    missing = [name for name in (*TAILSCALE_TOOLS, *OUR_TOOLS) if not (BIN / name).exists()]
    if missing:
        raise InteropUnavailable(f"go build left no {', '.join(missing)} in {BIN}")
    return BIN


class Proc:
    """A program running in a namespace, its output teed to a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str], stdin: Any = subprocess.DEVNULL) -> None:
        self.argv = argv
        self.log_path = log_path
        self.lines: list[str] = []
        self._log = log_path.open("w")
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=stdin, text=True,
                                      env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            self._log.write(line)
            self._log.flush()

    def wait_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in self.lines:
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.argv[0]} exited ({self.popen.returncode}) before /{pattern}/:\n"
                                     + self.tail())
            return None

        return wait_until(found, timeout=timeout, what=f"/{pattern}/ from {Path(self.argv[0]).name}")

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def tail(self, count: int = 60) -> str:
        return "\n".join(self.lines[-count:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._reader.join(5)
        self._log.close()


_ns_counter = itertools.count()


class NetNS:
    """A network namespace of the test's own: lo, and veth0/veth1 with 192.0.2.1/24 and 192.0.2.2/24.

    `/etc/netns/NAME/hosts` (which `ip netns exec` mounts over /etc/hosts) names the relays, and
    its resolv.conf points at loopback, so no lookup can leave either."""

    ADDRESSES = ("192.0.2.1", "192.0.2.2")

    def __init__(self, workdir: Path, hosts: dict[str, str] | None = None) -> None:
        self.name = f"derpit{os.getpid()}x{next(_ns_counter)}"
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.clusters: list[ClusterProcess] = []
        self.etc = Path("/etc/netns") / self.name
        self.hosts = dict(hosts or {})
        self._logs = itertools.count()

    def __enter__(self) -> NetNS:
        self.etc.mkdir(parents=True, exist_ok=True)
        self.write_hosts()
        (self.etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        steps = [
            ["ip", "netns", "add", self.name],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
            ["ip", "-n", self.name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"],
            ["ip", "-n", self.name, "addr", "add", f"{self.ADDRESSES[0]}/24", "dev", "veth0"],
            ["ip", "-n", self.name, "addr", "add", f"{self.ADDRESSES[1]}/24", "dev", "veth1"],
            ["ip", "-n", self.name, "link", "set", "veth0", "up"],
            ["ip", "-n", self.name, "link", "set", "veth1", "up"],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode != 0:
                self.__exit__()
                raise InteropUnavailable(f"{' '.join(step)}: {proc.stderr.strip()} (the interop tier needs root)")
        return self

    def __exit__(self, *exc: object) -> None:
        for cluster in reversed(self.clusters):
            with contextlib.suppress(Exception):
                cluster.stop()
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        shutil.rmtree(self.etc, ignore_errors=True)

    def write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost"] + [f"{ip} {name}" for name, ip in self.hosts.items()]
        (self.etc / "hosts").write_text("\n".join(lines) + "\n")

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        return {**os.environ, **BASE_ENV, "HOME": str(home), **(extra or {})}

    def start(self, argv: Sequence[str], *, env: dict[str, str] | None = None, name: str = "",
              stdin: Any = subprocess.DEVNULL) -> Proc:
        label = name or Path(argv[0]).name
        log_path = self.workdir / f"{next(self._logs):02d}-{label}.log"
        proc = Proc([*self.prefix(), *map(str, argv)], log_path, self.env(env), stdin=stdin)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 60.0,
            check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.prefix(), *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                              env=self.env(env), input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc


class NamespacedCluster(ClusterProcess):
    """`cluster up` inside a namespace, with the worker log lines that tell which worker holds a key."""

    def __init__(self, ns: NetNS, *args: str, host: str = "127.0.0.1", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ns = ns
        self.host = host

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--listen") + 1] = f"{self.host}:{self.port}"
        if "--stun" in cmd:
            cmd[cmd.index("--stun") + 1] = f"{self.host}:{self.stun_port}"
        return [*self.ns.prefix(), *cmd]

    def start(self, wait: bool = True) -> NamespacedCluster:
        self.env = {**BASE_ENV, **(self.env or {})}
        self.ns.clusters.append(self)  # stopped with the namespace, whatever the test does
        super().start(wait)
        return self

    def worker_of(self) -> dict[str, int]:
        """Node key prefix (8 hex digits) -> the worker that last admitted it, from the debug log."""
        owners: dict[str, int] = {}
        pattern = re.compile(r" worker(\d+) DEBUG relay_worker\.conn: client ([0-9a-f]{8}) connected")
        for line in self.output:
            match = pattern.search(line)
            if match:
                owners[match.group(2)] = int(match.group(1))
        return owners


def derpmap_text(flags: Sequence[str], *extra: str) -> str:
    """`cluster derpmap` with the flags the node runs with: the map the scenarios use, unedited."""
    proc = subprocess.run([sys.executable, "-m", "cluster", "derpmap", *extra, *flags], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"cluster derpmap failed: {proc.stderr}")
    return proc.stdout


def derpmap(flags: Sequence[str], *, fmt: str = "tailscale") -> dict[str, Any]:
    """The map as JSON: the policy file's derpMap, or (fmt="headscale") headscale's derp.urls shape."""
    extra = ["--format", "headscale", "--json"] if fmt == "headscale" else []
    doc: dict[str, Any] = json.loads(derpmap_text(flags, *extra))
    return doc


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


class Control:
    """Tailscale's testcontrol, serving the given derpMap; /verify answers derper's admission protocol."""

    def __init__(self, ns: NetNS, bins: Path, derp_map: dict[str, Any] | str) -> None:
        """derp_map: a JSON document, or headscale's YAML text (tscontrol decodes it as headscale does)."""
        if isinstance(derp_map, str):
            map_file = ns.workdir / "control-derpmap.yaml"
            map_file.write_text(derp_map)
        else:
            map_file = write_json(ns.workdir / "control-derpmap.json", derp_map)
        self.proc = ns.start([bins / "tscontrol", "-listen", "127.0.0.1:0", "-derpmap", map_file], name="tscontrol")
        self.url = self.proc.wait_line(r"^control (http://\S+)").group(1)

    @property
    def verify_url(self) -> str:
        return self.url + "/verify"


def tsnet_pairs(ns: NetNS, bins: Path, control: Control, *, pairs: int, size: int = 10 << 20,
                env: dict[str, str] | None = None, extra: Sequence[str] = (), timeout: float = 150.0,
                check: bool = True) -> list[dict[str, Any]]:
    """Run tsnetpair: pairs of tsnet nodes, a disco ping through DERP and a transfer each."""
    state = Path(tempfile.mkdtemp(prefix="tsnet-", dir=ns.workdir))
    argv = [bins / "tsnetpair", "-control", control.url, "-pairs", str(pairs), "-bytes", str(size), "-dir", state,
            "-timeout", f"{int(timeout)}s", *extra]
    proc = ns.run(argv, env={"TS_DEBUG_ALWAYS_USE_DERP": "1", **(env or {})}, timeout=timeout + 30, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if check and (proc.returncode != 0 or len(results) != pairs or not all(r["ok"] for r in results)):
        raise AssertionError(f"tsnetpair exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return results


class Tailscaled:
    """One tailscaled in the namespace, logged into the test's control server."""

    def __init__(self, ns: NetNS, bins: Path, name: str, env: dict[str, str]) -> None:
        self.ns, self.bins, self.name = ns, bins, name
        self.dir = ns.workdir / f"tailscaled-{name}"
        self.dir.mkdir()
        self.socket = self.dir / "tailscaled.sock"
        self.env = env
        self.proc: Proc = ns.start([bins / "tailscaled", "--tun=userspace-networking", f"--statedir={self.dir}",
                                    f"--socket={self.socket}", "--port=0"], env=env, name=f"tailscaled-{name}")
        wait_until(self.socket.exists, timeout=30, what=f"tailscaled {name} socket")

    def cli(self, *args: str, timeout: float = 60.0, check: bool = True, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return self.ns.run([self.bins / "tailscale", f"--socket={self.socket}", *args], env=env or self.env,
                           timeout=timeout, check=check)

    def up(self, control: Control) -> str:
        self.cli("up", f"--login-server={control.url}", f"--hostname={self.name}", "--timeout=60s", timeout=90)
        return self.cli("ip", "-4").stdout.strip()

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli("status", "--json").stdout)
        return doc


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if os.environ.get("INTEROP_KEEP"):
            print(f"interop: kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)
