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
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from .config import SETTINGS_BY_KEY, Config, ConfigError
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
        preflight(self.config)
        host, port = self.config.listen_addr
        if port == 0:
            raise ConfigError("server.listen (--listen): workers share the port, so it cannot be 0")
        check_port_free(host, port)
        check_http_port(self.config)
        if self.config.values["server.certmode"] == "letsencrypt":
            from .acme import preflight as acme_preflight

            acme_preflight(self.config)
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
        if self.config.values["server.certmode"] == "letsencrypt":
            from .acme import AcmeManager
            from .http_port import ACME_DIR_ENV

            # waits for the workers' HTTP port itself, then orders (or renews) the certificate
            self.acme = AcmeManager(self.config)
            self.extra_env[ACME_DIR_ENV] = str(self.acme.challenges)
            self.acme.start()
        token = self.config.admin_token_value()
        if token:
            # Workers get the admin token through a 0600 file in the (0700) run dir, never on their
            # command line, which every local user can read in /proc/PID/cmdline.
            path = self.run_dir / "admin-token"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(token + "\n")
            self._admin_token_file = str(path)

    def settings_json(self) -> str:
        values = dict(self.config.values)
        values["server.run_dir"] = str(self.run_dir)
        values["server.state_dir"] = str(self.config.state_path)
        values["server.key_file"] = str(self.config.server_key_path)
        values["server.admin_token"] = ""
        values["server.admin_token_file"] = getattr(self, "_admin_token_file", "")
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
            if getattr(self, "acme", None) is not None:
                self.acme.close()

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


def preflight(config: Config) -> None:
    """Every setting a worker would refuse, checked once before any worker starts, so a bad value is
    one line and exit 2 instead of N workers crashing in a restart loop."""
    v = config.values
    state = config.state_path
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"server.state_dir (--state-dir): cannot write to {state}: {exc.strerror}; "
                          "pick a directory this user can write (it holds the server key)") from exc
    from relay_worker.keys import load_or_create_server_key

    key_path = config.server_key_path
    try:
        load_or_create_server_key(key_path)
    except OSError as exc:
        raise ConfigError(f"server.key_file (--key-file / -c): cannot read or create {key_path}: "
                          f"{exc.strerror}; point it at a writable path") from exc
    except Exception as exc:  # keys.KeyError_: not derper's {"PrivateKey": "privkey:..."} JSON
        raise ConfigError(f"server.key_file (--key-file / -c): {exc}; fix or remove the file "
                          "(a new key is created when it is missing)") from exc
    if v["server.mesh_key_file"]:
        path = Path(v["server.mesh_key_file"])
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"server.mesh_key_file (--mesh-key-file / -mesh-psk-file): cannot read {path}: "
                              f"{exc.strerror}") from exc
        if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise ConfigError(f"server.mesh_key_file (--mesh-key-file / -mesh-psk-file): {path} must hold 64 "
                              "hex characters (derper's mesh key format)")
    if v["server.mesh_with"] and not v["server.mesh_key_file"]:
        raise ConfigError("server.mesh_with (--mesh-with): meshing with derpers needs their mesh key; "
                          "pass --mesh-key-file / -mesh-psk-file FILE")
    if v["server.admin_token_file"] and not v["server.admin_token"]:
        try:
            Path(v["server.admin_token_file"]).read_text()
        except OSError as exc:
            raise ConfigError(f"server.admin_token_file (--admin-token-file): cannot read "
                              f"{v['server.admin_token_file']}: {exc.strerror}") from exc
    if v["admission.verify_clients"]:
        sock = v["admission.tailscaled_socket"] or "/var/run/tailscale/tailscaled.sock"
        try:
            is_socket = stat.S_ISSOCK(os.stat(sock).st_mode)
        except OSError as exc:
            raise ConfigError(f"admission.tailscaled_socket (--tailscaled-socket / -socket): --verify-clients "
                              f"needs tailscaled's socket, and {sock}: {exc.strerror}; start tailscaled or "
                              "point -socket at its socket") from exc
        if not is_socket:
            raise ConfigError(f"admission.tailscaled_socket (--tailscaled-socket / -socket): {sock} is not a "
                              "unix socket; point it at tailscaled's socket")
    url = v["admission.verify_client_url"]
    if url:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"admission.verify_client_url (--verify-client-url): {url!r} is not an "
                              "http(s)://HOST[:PORT]/PATH URL")
    if v["admission.allow_keys_file"] and not Path(v["admission.allow_keys_file"]).is_file():
        raise ConfigError(f"admission.allow_keys_file (--allow-keys-file): {v['admission.allow_keys_file']} "
                          "does not exist; create it (one nodekey:<hex> per line)")
    if v["admission.timeout"] <= 0:
        raise ConfigError("admission.timeout (--admission-timeout): must be > 0 seconds")
    if v["limits.handshake_timeout"] <= 0:
        raise ConfigError("limits.handshake_timeout (--handshake-timeout): must be > 0 seconds")
    for key in ("limits.accept_connection_limit", "limits.accept_connection_limit_per_ip", "admission.cache_ttl"):
        if v[key] < 0:
            raise ConfigError(f"{key} ({SETTINGS_BY_KEY[key].flag}): must be >= 0 (0 = off)")
    for key in ("limits.bytes_per_second", "limits.bytes_burst", "limits.accept_connection_burst",
                "limits.max_clients"):
        if v[key] < 0:
            raise ConfigError(f"{key} ({SETTINGS_BY_KEY[key].flag}): must be >= 0 (0 = unlimited)")


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
