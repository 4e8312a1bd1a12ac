"""`cluster up`: start, watch, restart and drain the worker processes of one node.

The supervisor serves nothing hot: each worker binds the DERP port itself (SO_REUSEPORT) and the
supervisor only manages processes. Its state (workers, pids, restarts) is written to
RUN_DIR/supervisor.json for `cluster status`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from .config import Config, ConfigError
from .http_port import check_http_port
from .ports import check_port_free
from .tls import check_tls_config

RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0
DRAIN_TIMEOUT = 10.0


@dataclass
class WorkerSlot:
    index: int
    pid: int = 0
    started: float = 0.0
    incarnation: int = 0
    restarts: int = 0
    backoff: float = RESTART_BACKOFF_MIN
    next_start: float = 0.0
    last_exit: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(replace(self, process=None)).items() if name != "process"}


class Supervisor:
    def __init__(self, config: Config, out: TextIO = sys.stdout) -> None:
        self.config = config
        self.out = out
        self.run_dir = config.run_path
        self.slots = [WorkerSlot(i) for i in range(config.worker_count)]
        self.stopping = False
        self.forced = False
        self.recent_restarts: list[dict[str, Any]] = []
        self.started = time.time()
        self._lock_file: Any = None
        self.extra_env: dict[str, str] = {}

    # -- setup --------------------------------------------------------------------------------------

    def prepare(self) -> None:
        host, port = self.config.listen_addr
        if port == 0:
            raise ConfigError("server.listen (--listen): workers share the port, so it cannot be 0")
        check_port_free(host, port)
        check_http_port(self.config)
        tls_note = check_tls_config(self.config)
        if tls_note:
            self.say(tls_note)
        stun = self.config.stun_addr
        if stun is not None:
            check_port_free(*stun, setting="stun.listen (--stun)", kind=socket.SOCK_DGRAM,
                            fix="pick another port or --no-stun")
        mesh = self.config.mesh_addr
        if mesh is not None:
            for index in range(len(self.slots)):
                try:
                    check_port_free(mesh[0], mesh[1] + index)
                except ConfigError as exc:
                    raise ConfigError(f"node.mesh_listen (--mesh-listen): worker {index} needs port "
                                      f"{mesh[1] + index}, which is in use; pick another base port") from exc
        if self.config.node_mesh_secret_file:
            from mesh.curve import MeshSecretError, read_secret_file

            try:
                read_secret_file(Path(self.config.node_mesh_secret_file))
            except MeshSecretError as exc:
                raise ConfigError(f"node.mesh_secret_file (--mesh-secret-file): {exc}") from exc
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        self._lock_file = open(self.run_dir / "supervisor.lock", "w")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise ConfigError(f"server.run_dir (--run-dir): {self.run_dir} is in use by another cluster; "
                              "give each cluster its own --run-dir") from exc
        (self.run_dir / "supervisor.pid").write_text(f"{os.getpid()}\n")

    def settings_json(self) -> str:
        values = dict(self.config.values)
        values["server.run_dir"] = str(self.run_dir)
        values["server.state_dir"] = str(self.config.state_path)
        return json.dumps(values)

    # -- processes ----------------------------------------------------------------------------------

    def start_worker(self, slot: WorkerSlot) -> None:
        slot.incarnation += 1
        cmd = [sys.executable, "-m", "cluster.worker_main", "--index", str(slot.index),
               "--incarnation", str(int(time.time() * 1000) * 100 + slot.incarnation % 100),
               "--settings", self.settings_json()]
        env = dict(os.environ, **self.extra_env)
        # A worker ignores SIGHUP until its own handler (reload the allow-keys file) is installed, so
        # a reload signal forwarded while it is still importing cannot kill it.
        slot.process = subprocess.Popen(cmd, env=env, start_new_session=False, preexec_fn=_ignore_sighup)
        slot.pid = slot.process.pid
        slot.started = time.time()
        self.write_state()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        pending = {slot.index for slot in self.slots}
        while pending and time.monotonic() < deadline:
            for index in list(pending):
                if _admin_socket_answers(self.run_dir / f"worker-{index}.sock"):
                    pending.discard(index)
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is not None:
                    return False
            if pending:
                time.sleep(0.05)
        return not pending

    def poll_workers(self) -> None:
        now = time.time()
        for slot in self.slots:
            proc = slot.process
            if proc is not None:
                code = proc.poll()
                if code is None:
                    if now - slot.started > STABLE_AFTER:
                        slot.backoff = RESTART_BACKOFF_MIN
                    continue
                slot.last_exit = code
                slot.process = None
                slot.pid = 0
                if self.stopping:
                    continue
                slot.restarts += 1
                slot.next_start = now + slot.backoff
                self.recent_restarts = [*self.recent_restarts[-19:], {
                    "worker": slot.index, "exit": code, "at": now, "next_start_in": slot.backoff}]
                self.say(f"worker {slot.index} exited with {code}; restarting in {slot.backoff:.1f}s")
                slot.backoff = min(slot.backoff * 2, RESTART_BACKOFF_MAX)
                self.write_state()
            elif not self.stopping and now >= slot.next_start:
                self.start_worker(slot)

    def stop_workers(self, sig: int = signal.SIGTERM) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(sig)

    # -- main loop ----------------------------------------------------------------------------------

    def on_signal(self, sig: int, frame: Any) -> None:
        if self.stopping:
            self.forced = True
            self.stop_workers(signal.SIGKILL)
        else:
            self.stopping = True
            self.stop_workers(signal.SIGTERM)

    def run(self) -> int:
        try:
            return self._run()
        finally:
            # Whatever happened to the supervisor, it must not leave orphaned workers behind.
            self.stop_workers(signal.SIGKILL)

    def _run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        # SIGHUP reloads what workers can reload (the allow-keys file, admission cache)
        signal.signal(signal.SIGHUP, lambda sig, frame: self.stop_workers(signal.SIGHUP))
        for slot in self.slots:
            self.start_worker(slot)
        if not self.wait_ready():
            self.say("error: workers failed to start (see their log lines above)")
            self.stopping = True
            self.stop_workers(signal.SIGKILL)
            return 1
        self.announce()
        while not self.stopping:
            self.poll_workers()
            time.sleep(0.1)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while any(s.process and s.process.poll() is None for s in self.slots):
            if time.monotonic() > deadline and not self.forced:
                self.say("workers did not stop in time; killing them")
                self.forced = True
                self.stop_workers(signal.SIGKILL)
            time.sleep(0.05)
        self.poll_workers()
        self.write_state()
        self.say("stopped" + (" (forced)" if self.forced else ""))
        return 1 if self.forced else 0

    def announce(self) -> None:
        from .derpmap import node_snippet

        host, port = self.config.listen_addr
        scheme = "https" if self.config.tls else "http"
        shown = self.config.hostname or ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host)
        self.say(f"DERP cluster serving {scheme}://{shown}:{port}/derp with {len(self.slots)} workers")
        stun = self.config.stun_addr
        self.say(f"STUN on udp {stun[0]}:{stun[1]}" if stun else "STUN disabled")
        self.say(f"run dir {self.run_dir}; status: cluster status --run-dir {self.run_dir}")
        mesh = self.config.mesh_addr
        if mesh is not None:
            secured = "CURVE-encrypted" if self.config.node_mesh_secret_file else \
                "NO mesh secret: unencrypted, loopback only"
            self.say(f"node {self.config.node_name} region {self.config.node_region_id}: mesh on tcp "
                     f"{mesh[0]}:{mesh[1]}..{mesh[1] + len(self.slots) - 1} ({secured}); "
                     f"joining {', '.join(self.config.node_join) or 'nobody (first node)'}")
        self.say("derpMap node: " + json.dumps(node_snippet(self.config)))

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def write_state(self) -> None:
        doc = {
            "pid": os.getpid(),
            "started": self.started,
            "listen": self.config.values["server.listen"],
            "workers": [slot.public() for slot in self.slots],
            "recent_restarts": self.recent_restarts,
        }
        tmp = self.run_dir / "supervisor.json.tmp"
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.run_dir / "supervisor.json")


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _admin_socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"GET /derp/probe HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
