"""`cluster up`: start, watch, restart and drain the worker processes of one node.

The supervisor serves nothing hot: each worker binds the DERP port itself (SO_REUSEPORT) and the
supervisor only manages processes. Its state (workers, pids, restarts) is written to
RUN_DIR/supervisor.json for `cluster status`.

Shaped like uvicorn's supervisors/multiprocess.py: signal handlers only queue the signal (and wake
the loop through the wakeup fd); the one main loop acts on them between its other steps, so a
signal can never land in the middle of a restart. Each worker has a socketpair to the supervisor
on which it answers a liveness ping from its event loop: a worker whose process exists but whose
loop no longer answers is killed and restarted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

from .config import SETTINGS_BY_KEY, Config, ConfigError
from .preflight import preflight

RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0
#: the default of server.shutdown_timeout: the one deadline all workers share after SIGTERM
DRAIN_TIMEOUT: float = SETTINGS_BY_KEY["server.shutdown_timeout"].default
#: how long a (re)started worker may take to serve before it counts as failed
STARTUP_TIMEOUT = 30.0
PING_INTERVAL = 1.0
STARTUP_PING_INTERVAL = 0.1
#: what a worker answers a ping with: serving, or still starting
PONG_SERVING = b"1"
PONG_STARTING = b"0"
SIGNAL_NAMES: dict[int, str] = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
#: WorkerSlot fields that stay in this process (not in supervisor.json)
_PRIVATE = {"process", "control", "launched", "unanswered_since", "kill_reason"}


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
    ready: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    control: socket.socket | None = field(default=None, repr=False)
    #: monotonic times: when the process was started; when the oldest ping it has not answered went
    #: out (silence is counted from a ping, so a supervisor that was itself paused kills nobody)
    launched: float = 0.0
    unanswered_since: float | None = None
    #: why the supervisor killed it, for the restart line
    kill_reason: str = ""

    def public(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _PRIVATE}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, config: Config, out: TextIO = sys.stdout) -> None:
        self.config = config
        self.out = out
        self.run_dir = config.run_path
        self.slots = [WorkerSlot(i) for i in range(config.worker_count)]
        self.liveness_timeout: float = config.values["server.worker_liveness_timeout"]
        self.shutdown_timeout: float = config.values["server.shutdown_timeout"]
        #: set by the first SIGTERM/SIGINT: when every worker must be gone
        self.stop_deadline: float | None = None
        self.forced = False
        self.signal_queue: list[int] = []
        self.selector = selectors.DefaultSelector()
        self.recent_restarts: list[dict[str, Any]] = []
        self.started = time.time()
        self._lock_file: Any = None
        self._admin_token_file = ""
        self._next_ping = 0.0
        self._wake_write: socket.socket | None = None
        self.acme: Any = None
        self.extra_env: dict[str, str] = {}

    @property
    def stopping(self) -> bool:
        return self.stop_deadline is not None

    # -- setup --------------------------------------------------------------------------------------

    def prepare(self) -> None:
        for line in preflight(self.config):
            self.say(line)
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
        values["server.admin_token_file"] = self._admin_token_file
        return json.dumps(values)

    # -- processes ----------------------------------------------------------------------------------

    def start_worker(self, slot: WorkerSlot) -> None:
        slot.incarnation += 1
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "cluster.worker_main", "--index", str(slot.index),
               "--incarnation", str(int(time.time() * 1000) * 100 + slot.incarnation % 100),
               "--control-fd", str(theirs.fileno()), "--settings", self.settings_json()]
        env = dict(os.environ, **self.extra_env)
        # A worker ignores SIGHUP until its own handler (reload the allow-keys file) is installed, so
        # a reload signal forwarded while it is still importing cannot kill it.
        try:
            slot.process = subprocess.Popen(cmd, env=env, start_new_session=False, preexec_fn=_ignore_sighup,
                                            pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        ours.setblocking(False)
        slot.control = ours
        self.selector.register(ours, selectors.EVENT_READ, slot)
        slot.pid = slot.process.pid
        slot.started = time.time()
        slot.launched = time.monotonic()
        slot.unanswered_since = None
        slot.ready = False
        slot.kill_reason = ""
        self.write_state()

    def close_control(self, slot: WorkerSlot) -> None:
        if slot.control is not None:
            self.selector.unregister(slot.control)
            slot.control.close()
            slot.control = None

    def ping_workers(self, interval: float = PING_INTERVAL) -> None:
        """One ping byte to each worker per interval; wait_events reads the answers."""
        now = time.monotonic()
        if now < self._next_ping:
            return
        self._next_ping = now + interval
        for slot in self.slots:
            if slot.control is not None:
                if slot.unanswered_since is None:
                    slot.unanswered_since = now
                # a full buffer means many unanswered pings: the liveness check sees to that worker
                with contextlib.suppress(BlockingIOError, ConnectionError):
                    slot.control.send(b"?")

    def read_answers(self, slot: WorkerSlot) -> None:
        assert slot.control is not None
        try:
            data = slot.control.recv(4096)
        except BlockingIOError:
            return
        except ConnectionError:
            data = b""
        if not data:  # the worker is gone; poll_workers reaps it
            self.close_control(slot)
            return
        slot.unanswered_since = None
        if PONG_SERVING in data and not slot.ready:
            slot.ready = True
            self.write_state()

    def check_liveness(self, slot: WorkerSlot) -> None:
        """Kill a worker whose process exists but which does not serve: poll_workers restarts it."""
        now = time.monotonic()
        silent = 0.0 if slot.unanswered_since is None else now - slot.unanswered_since
        if not slot.ready and now - slot.launched > STARTUP_TIMEOUT:
            reason = f"was not serving {STARTUP_TIMEOUT:g}s after it started"
        elif slot.ready and self.liveness_timeout > 0 and silent > self.liveness_timeout:
            reason = (f"did not answer the liveness ping for {silent:.1f}s "
                      f"(limit {self.liveness_timeout:g}s, --worker-liveness-timeout)")
        else:
            return
        assert slot.process is not None
        self.say(f"worker {slot.index} (pid {slot.pid}) {reason}; killing it")
        slot.kill_reason = reason
        with contextlib.suppress(ProcessLookupError):
            slot.process.kill()
        self.close_control(slot)  # no more answers count from this incarnation

    def poll_workers(self) -> None:
        now = time.time()
        for slot in self.slots:
            proc = slot.process
            if proc is not None:
                code = proc.poll()
                if code is None:
                    if now - slot.started > STABLE_AFTER:
                        slot.backoff = RESTART_BACKOFF_MIN
                    if not self.stopping and not slot.kill_reason:
                        self.check_liveness(slot)
                    continue
                self.close_control(slot)
                slot.last_exit = code
                slot.process = None
                slot.pid = 0
                slot.ready = False
                if self.stopping:
                    continue
                slot.restarts += 1
                slot.next_start = now + slot.backoff
                restart: dict[str, Any] = {"worker": slot.index, "exit": code, "at": now,
                                           "next_start_in": slot.backoff}
                if slot.kill_reason:
                    restart["reason"] = slot.kill_reason
                self.recent_restarts = [*self.recent_restarts[-19:], restart]
                why = " (killed by the supervisor, see above)" if slot.kill_reason else ""
                self.say(f"worker {slot.index} exited with {code}{why}; restarting in {slot.backoff:.1f}s")
                slot.backoff = min(slot.backoff * 2, RESTART_BACKOFF_MAX)
                self.write_state()
            elif not self.stopping and now >= slot.next_start:
                self.start_worker(slot)

    def signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            if slot.alive():
                assert slot.process is not None
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(sig)

    # -- signals ------------------------------------------------------------------------------------

    def on_signal(self, sig: int, frame: Any) -> None:
        # Only queue it: the main loop acts between its steps (the wakeup fd ends its wait).
        self.signal_queue.append(sig)

    def install_signal_handlers(self) -> socket.socket:
        """Queue SIGTERM, SIGINT and SIGHUP; returns the socket the wakeup fd writes to."""
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        self._wake_write = wake_write  # kept open for as long as the wakeup fd points at it
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        self.selector.register(wake_read, selectors.EVENT_READ, None)
        for sig in SIGNAL_NAMES:
            signal.signal(sig, self.on_signal)
        return wake_read

    def handle_signals(self) -> None:
        while self.signal_queue:
            sig = self.signal_queue.pop(0)
            name = SIGNAL_NAMES.get(sig, str(sig))
            if sig == signal.SIGHUP:
                # what workers can reload: the allow-keys file, the admission cache, the rate config
                self.say("SIGHUP: workers reload the allow-keys file and the rate config")
                self.signal_workers(signal.SIGHUP)
            elif not self.stopping:
                self.say(f"{name}: draining the workers (shutdown budget {self.shutdown_timeout:g}s)")
                self.begin_shutdown()
            elif not self.forced:
                self.say(f"{name} again: killing the workers now")
                self.forced = True
                self.signal_workers(signal.SIGKILL)

    def begin_shutdown(self) -> None:
        """Stop restarting; every worker stops accepting and drains, against one shared deadline."""
        self.stop_deadline = time.monotonic() + self.shutdown_timeout
        self.signal_workers(signal.SIGTERM)

    # -- main loop ----------------------------------------------------------------------------------

    def wait_events(self, timeout: float) -> None:
        """Sleep until a signal, a worker's answer or the timeout; read what arrived."""
        for key, _ in self.selector.select(timeout):
            slot = key.data
            if slot is None:  # the wakeup fd: the signals themselves are in signal_queue
                with contextlib.suppress(BlockingIOError):
                    key.fileobj.recv(4096)  # type: ignore[union-attr]
            else:
                self.read_answers(slot)

    def run(self) -> int:
        try:
            return self._run()
        finally:
            # Whatever happened to the supervisor, it must not leave orphaned workers behind.
            self.signal_workers(signal.SIGKILL)
            if self.acme is not None:
                self.acme.close()

    def _run(self) -> int:
        self.install_signal_handlers()
        for slot in self.slots:
            self.start_worker(slot)
        if not self.wait_ready():
            if not self.stopping:
                self.say("error: workers failed to start (see their log lines above)")
                self.stop_deadline = time.monotonic()
                self.signal_workers(signal.SIGKILL)
                return 1
        else:
            self.announce()
        while not self.stopping:
            self.wait_events(0.1)
            self.handle_signals()
            self.poll_workers()
            self.ping_workers()
        return self.finish_shutdown()

    def wait_ready(self) -> bool:
        """Until every worker serves (True), one exits or takes too long, or a stop signal (False)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(slot.ready for slot in self.slots):
            if time.monotonic() > deadline or self.stopping:
                return False
            if any(slot.process is not None and slot.process.poll() is not None for slot in self.slots):
                return False
            self.ping_workers(STARTUP_PING_INTERVAL)  # starting workers answer "not yet": ask again soon
            self.wait_events(0.05)
            self.handle_signals()
        return True

    def finish_shutdown(self) -> int:
        """Wait for the workers until the shutdown deadline, then kill the rest."""
        assert self.stop_deadline is not None
        while any(slot.alive() for slot in self.slots):
            if time.monotonic() > self.stop_deadline and not self.forced:
                self.say(f"workers did not stop within the {self.shutdown_timeout:g}s shutdown budget; "
                         "killing them")
                self.forced = True
                self.signal_workers(signal.SIGKILL)
            self.wait_events(0.05)
            self.handle_signals()
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
