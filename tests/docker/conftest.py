"""The container tier: deploy/Dockerfile built and deploy/docker-compose.yml run under a dockerd of
the test's own (tests/docker/harness.py says how)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.docker)
            item.add_marker(pytest.mark.slow)
            # the first test's setup may debootstrap a base and build the image: minutes when cold
            item.add_marker(pytest.mark.timeout(900))
