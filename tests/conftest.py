from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ClusterProcess

#: tiers by directory: each test there gets the tier's marker and `slow`, and the timeout its first
#: test's setup may need (interop builds Tailscale's programs, docker may debootstrap a base image)
TIER_TIMEOUTS = {"interop": 1500, "docker": 900, "multihost": None}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = Path(str(item.fspath)).relative_to(root).parts
        tier = parts[0] if len(parts) > 1 else ""
        if tier not in TIER_TIMEOUTS:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        item.add_marker(pytest.mark.slow)
        timeout = TIER_TIMEOUTS[tier]
        if timeout is not None:
            item.add_marker(pytest.mark.timeout(timeout))


@pytest.fixture(scope="module")
def one_worker() -> Iterator[ClusterProcess]:
    """One `cluster up --workers 1` shared by a module's tests (each test uses fresh keys)."""
    with ClusterProcess(workers=1) as cluster:
        yield cluster
