"""mesh.publish_gate: per-key gossip rate (pure, hypothesis)."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.publish_gate import PublishGate

KEYS = [bytes([n]) * 32 for n in range(3)]
INTERVAL = 1.0
BURST = 3

steps = st.lists(
    st.tuples(st.sampled_from(["offer", "offer", "due", "discard"]), st.sampled_from(KEYS),
              st.floats(0, 0.7, allow_nan=False)),
    max_size=80,
)


@given(steps)
def test_at_most_burst_plus_one_per_interval_and_the_last_write_is_never_lost(script: list) -> None:
    gate = PublishGate(INTERVAL, BURST)
    now = 0.0
    published: dict[bytes, list[float]] = defaultdict(list)
    for op, key, dt in script:
        now += dt
        if op == "offer":
            if gate.offer(key, now):
                published[key].append(now)
        elif op == "discard":
            gate.discard(key)
        else:
            for k in gate.due(now):
                published[k].append(now)
    for times in published.values():
        for i in range(len(times)):
            for j in range(i, len(times)):
                assert j - i + 1 <= BURST + (times[j] - times[i]) / INTERVAL + 1e-9
    # every held write goes out within one interval of quiet; then the gate forgets everything
    now += INTERVAL
    gate.due(now)
    assert gate.held == 0
    now += BURST * INTERVAL
    gate.due(now)
    assert len(gate) == 0


def test_a_flapping_key_is_coalesced() -> None:
    gate = PublishGate(INTERVAL, BURST)
    sent = sum(gate.offer(KEYS[0], i * 0.001) for i in range(10_000))  # 10 000 writes in 10 s
    assert sent == BURST
    assert gate.held == 1 and gate.held_writes == 10_000 - BURST
    assert gate.due(10.0) == [KEYS[0]] and gate.held == 0


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        PublishGate(0)
    with pytest.raises(ValueError):
        PublishGate(1.0, burst=0)
