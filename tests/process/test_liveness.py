"""mesh.liveness: the alive/busy/dead verdict and the loop monitor (pure, hypothesis), and the
pulse thread over real ZeroMQ."""

from __future__ import annotations

from pathlib import Path

import zmq
from hypothesis import given
from hypothesis import strategies as st

from mesh import wire
from mesh.liveness import ALIVE, BUSY, DEAD, PULSE, LoopMonitor, Pulser, verdict
from tests.support import wait_until

times = st.floats(0, 1_000, allow_nan=False)
spans = st.floats(0.01, 100, allow_nan=False)


@given(times, times, times, spans, st.floats(0, 100, allow_nan=False))
def test_dead_only_after_total_silence_or_a_wedged_loop(now: float, heard: float, pulse: float, limit: float,
                                                        grace: float) -> None:
    state = verdict(now, heard, pulse, limit, grace)
    if state == DEAD:
        assert now - max(heard, pulse) > limit or now - heard > limit + grace
    else:
        assert now - heard <= limit + grace
    if now - heard <= limit:
        assert state == ALIVE
    if state == BUSY:
        assert now - pulse <= limit < now - heard


@given(times, times, times, spans, st.floats(0, 100, allow_nan=False), st.floats(0, 100, allow_nan=False))
def test_silence_only_gets_worse_with_time(now: float, heard: float, pulse: float, limit: float, grace: float,
                                           later: float) -> None:
    order = {ALIVE: 0, BUSY: 1, DEAD: 2}
    assert order[verdict(now + later, heard, pulse, limit, grace)] >= order[verdict(now, heard, pulse, limit, grace)]


@given(times, times, times, spans, st.floats(0, 100, allow_nan=False), st.floats(0, 100, allow_nan=False))
def test_a_newer_pulse_never_makes_a_member_deader(now: float, heard: float, pulse: float, limit: float,
                                                   grace: float, newer: float) -> None:
    order = {ALIVE: 0, BUSY: 1, DEAD: 2}
    assert order[verdict(now, heard, pulse + newer, limit, grace)] <= order[verdict(now, heard, pulse, limit, grace)]


@given(st.lists(st.floats(0, 20, allow_nan=False), max_size=30))
def test_loop_monitor_lag(gaps: list[float]) -> None:
    m = LoopMonitor(interval=0.5, stall_after=1.0)
    now = 100.0
    assert m.beat(now) == 0.0
    lags = []
    for gap in gaps:
        assert abs(m.silent_for(now + gap) - gap) < 1e-9
        now += gap
        lags.append(m.beat(now))
        assert abs(lags[-1] - max(0.0, gap - 0.5)) < 1e-9
    assert m.max_lag == max(lags, default=0.0)
    assert m.stalls == sum(1 for lag in lags if lag > 1.0)


def test_pulser_pulses_from_its_own_socket_and_withholds_when_the_loop_is_wedged(tmp_path: Path) -> None:
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    endpoint = f"ipc://{tmp_path}/inbox.ipc"
    inbox.bind(endpoint)
    silent = [0.2]
    pulser = Pulser(context, lambda: ("n", 3, 7), lambda: silent[0], interval=0.05, busy_grace=5.0)
    pulser.set_targets({("n", 0): endpoint})
    pulser.start()
    try:
        assert inbox.poll(5000), "no pulse arrived"
        message = inbox.recv()
        assert message[0] == PULSE
        assert wire.parse_control(message) == {"node": "n", "worker": 3, "inc": 7, "silent_ms": 200}
        silent[0] = 6.0  # our loop has been silent longer than the grace: look dead to everyone
        wait_until(lambda: pulser.withheld > 0, timeout=5, what="pulses to be withheld")
        while inbox.poll(200):  # drain what was queued before
            inbox.recv()
        sent = pulser.sent
        wait_until(lambda: pulser.withheld > 3, timeout=5, what="more withheld pulses")
        assert pulser.sent == sent and not inbox.poll(0)
    finally:
        pulser.stop()
        inbox.close(linger=0)
        context.term()


def test_pulser_speaks_curve_to_a_curve_inbox_on_ipc_too(tmp_path: Path) -> None:
    # with a cluster secret every inbox endpoint (ipc as well as tcp) is a CURVE server
    import os

    from mesh.curve import derive_curve_keys, start_authenticator
    from mesh.transport import MeshTransport

    keys = derive_curve_keys(os.urandom(32))
    context = zmq.Context()
    auth = start_authenticator(context, keys)
    got: list[bytes] = []
    inbox = MeshTransport([f"ipc://{tmp_path}/curve.ipc"], got.append, curve=keys, context=context)
    pulser = Pulser(context, lambda: ("n", 1, 2), lambda: 0.0, interval=0.05, busy_grace=5.0, curve=keys)
    pulser.set_targets({("n", 0): inbox.bound[0]})
    pulser.start()
    try:
        assert inbox.inbox.poll(5000), "no pulse got through CURVE"
        assert wire.parse_control(inbox.inbox.recv())["inc"] == 2
    finally:
        pulser.stop()
        inbox.close()
        auth.stop()
        context.term()
