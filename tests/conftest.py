from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ClusterProcess

#: tiers by directory: (marks `slow`, timeout of the tier's first setup or None for the default).
#: unit: pure code, no processes or sockets of a server; process: real workers, ZeroMQ, `cluster up`
#: on loopback; interop builds Tailscale's programs, docker may debootstrap a base image.
TIERS: dict[str, tuple[bool, int | None]] = {
    "unit": (False, None),
    "process": (False, None),
    "faults": (True, None),
    "interop": (True, 1500),
    "docker": (True, 900),
    "multihost": (True, None),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = Path(str(item.fspath)).relative_to(root).parts
        tier = parts[0] if len(parts) > 1 else ""
        if tier not in TIERS:
            continue
        slow, timeout = TIERS[tier]
        item.add_marker(getattr(pytest.mark, tier))
        if slow:
            item.add_marker(pytest.mark.slow)
        if timeout is not None:
            item.add_marker(pytest.mark.timeout(timeout))


@pytest.fixture(scope="module")
def one_worker() -> Iterator[ClusterProcess]:
    """One `cluster up --workers 1` shared by a module's tests (each test uses fresh keys)."""
    with ClusterProcess(workers=1) as cluster:
        yield cluster
