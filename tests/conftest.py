from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import ClusterProcess


@pytest.fixture(scope="module")
def one_worker() -> Iterator[ClusterProcess]:
    """One `cluster up --workers 1` shared by a module's tests (each test uses fresh keys)."""
    with ClusterProcess(workers=1) as cluster:
        yield cluster
