"""Liveness that one busy event loop cannot fake as a death.

A worker's heartbeats (mesh.worker_mesh) are sent by its asyncio loop, so a loop that one client
keeps busy for seconds stops heartbeating although the process is alive and will serve again.
Deciding "dead" from them alone dropped the keys of every client of that worker. So each worker
also runs a `Pulser`: a thread with its own ZeroMQ sockets (sockets are not thread-safe; the
context is) that sends a small PULSE to every peer once per heartbeat interval, carrying how long
ago the worker's loop last ticked. A peer then tells three states apart (`verdict`):

- ALIVE: a loop heartbeat within the silence limit;
- BUSY: no loop heartbeat within the limit, but pulses still arrive and the loop has been silent
  for at most limit + `busy_grace`: the process runs, its loop lags; its keys stay;
- DEAD: nothing at all (killed, SIGSTOPped, host gone, partitioned) within the limit, or a loop
  silent for more than limit + busy_grace (wedged: alive to the kernel, useless to its clients).

The pulser also stops pulsing by itself once its own loop has not ticked for busy_grace, so a
wedged worker looks dead to everyone even if a peer's clock of its silence started late.

`LoopMonitor` and `verdict` are pure (they take `now`); `Pulser` is the thin I/O shell.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import zmq

from .transport import CurveKeys, keep_link_fresh
from .wire import build_control

log = logging.getLogger("mesh.liveness")

#: control message kind of a pulse (mesh.wire numbers the others; this one stays out of their way)
PULSE = 0x10

ALIVE = "alive"
BUSY = "busy"
DEAD = "dead"

#: pulses a peer may have queued before we drop (a dead peer must not pile them up)
PULSE_HWM = 16


def verdict(now: float, last_heard: float, last_pulse: float, limit: float, busy_grace: float) -> str:
    """What a member's silence means. `last_heard`: its last loop message (heartbeat, delta,
    repair); `last_pulse`: its last pulse from the liveness thread; `limit`: the silence limit
    (dead_after); `busy_grace`: how much longer a lagging loop is waited for."""
    if now - last_heard <= limit:
        return ALIVE
    if now - last_pulse <= limit and now - last_heard <= limit + busy_grace:
        return BUSY
    return DEAD


@dataclass
class LoopMonitor:
    """The loop's lag, from beats the loop makes every `interval` seconds (pure: pass `now`)."""

    interval: float
    last_beat: float = 0.0
    lag: float = 0.0  # of the latest beat
    max_lag: float = 0.0
    stalls: int = 0  # beats that came more than `stall_after` late
    stall_after: float = 1.0
    beats: int = 0

    def beat(self, now: float) -> float:
        """The loop ran: returns how late this beat is (0 if on time, or the first one)."""
        lag = max(0.0, now - self.last_beat - self.interval) if self.last_beat else 0.0
        self.last_beat = now
        self.beats += 1
        self.lag = lag
        if lag > self.max_lag:
            self.max_lag = lag
        if lag > self.stall_after:
            self.stalls += 1
        return lag

    def silent_for(self, now: float) -> float:
        """Seconds since the loop last beat (what a pulse reports)."""
        return max(0.0, now - self.last_beat) if self.last_beat else 0.0

    def stats(self) -> dict[str, float]:
        return {"lag": round(self.lag, 3), "max_lag": round(self.max_lag, 3), "stalls": self.stalls,
                "beats": self.beats}


class Pulser:
    """The liveness thread of one worker: pulses every peer from its own sockets.

    `identity()` returns the current ``(node, worker, incarnation)`` (the incarnation changes on a
    rejoin); `silent_for()` how long the loop has not ticked. The loop hands over the peers with
    `set_targets` (a new dict each time: the thread only ever reads a whole one)."""

    def __init__(
        self,
        context: zmq.Context,  # type: ignore[type-arg]
        identity: Callable[[], tuple[str, int, int]],
        silent_for: Callable[[], float],
        *,
        interval: float,
        busy_grace: float,
        curve: CurveKeys | None = None,
    ) -> None:
        self.context = context
        self.identity = identity
        self.silent_for = silent_for
        self.interval = interval
        self.busy_grace = busy_grace
        self.curve = curve
        self._targets: dict[Hashable, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.withheld = 0  # pulses not sent because our own loop is wedged

    def set_targets(self, targets: dict[Hashable, str]) -> None:
        if targets != self._targets:
            self._targets = dict(targets)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mesh-pulse", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _socket(self, endpoint: str) -> zmq.Socket:  # type: ignore[type-arg]
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, PULSE_HWM)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        keep_link_fresh(sock)
        if self.curve is not None:  # the inbox is a CURVE server on every endpoint, ipc too
            sock.curve_secretkey = self.curve.secret
            sock.curve_publickey = self.curve.public
            sock.curve_serverkey = self.curve.server_public
        sock.connect(endpoint)
        return sock

    def _run(self) -> None:
        sockets: dict[Hashable, tuple[str, Any]] = {}
        try:
            while not self._stop.wait(self.interval):
                targets = self._targets
                for peer in [p for p, (ep, _) in sockets.items() if targets.get(p) != ep]:
                    sockets.pop(peer)[1].close(linger=0)
                for peer, endpoint in targets.items():
                    if peer not in sockets:
                        sockets[peer] = (endpoint, self._socket(endpoint))
                silent = self.silent_for()
                if silent > self.busy_grace:
                    self.withheld += 1
                    continue
                node, worker, inc = self.identity()
                message = build_control(PULSE, {"node": node, "worker": worker, "inc": inc,
                                                "silent_ms": int(silent * 1000)})
                for _, sock in sockets.values():
                    try:
                        sock.send(message, zmq.NOBLOCK)
                        self.sent += 1
                    except zmq.ZMQError:
                        pass
        except Exception:  # the thread must never die silently: peers would see a worker die
            log.exception("mesh pulse thread failed")
        finally:
            for _, sock in sockets.values():
                sock.close(linger=0)


def install_stall_hook(loop: Any) -> bool:
    """Tests only (DERP_TEST_HOOKS=1): SIGUSR2 makes the worker's loop spin, holding the GIL like a
    CPU-bound flood would, for DERP_TEST_STALL_SECONDS (default 6). Returns whether installed."""
    if os.environ.get("DERP_TEST_HOOKS") != "1":
        return False
    seconds = float(os.environ.get("DERP_TEST_STALL_SECONDS", "6"))

    def stall() -> None:
        log.warning("test hook: stalling the loop for %.1fs", seconds)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass

    loop.add_signal_handler(signal.SIGUSR2, stall)
    return True
