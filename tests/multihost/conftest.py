"""The multihost tier: three nodes, each in a network namespace of its own, three regions 30/80/150 ms
apart through user-space delay proxies (tests/multihost/netns.py). Needs root and `ip`; without
them the tier skips, or under CI=true fails with one line."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.multihost.netns import Topology, Unavailable
from tests.multihost.scenarios import form_mesh_sync

_capability: str | None = None
_checked = False


def _missing_capability() -> str | None:
    global _capability, _checked
    if not _checked:
        _checked = True
        if os.geteuid() != 0:
            _capability = "not root: the multihost tier creates network namespaces"
        elif shutil.which("ip") is None:
            _capability = "no `ip` (iproute2): the multihost tier creates network namespaces with it"
        else:
            probe = f"dmhprobe{os.getpid()}"
            proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
            if proc.returncode != 0:
                _capability = f"ip netns add: {proc.stderr.strip()}"
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return _capability


def require_namespaces() -> None:
    missing = _missing_capability()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"multihost tier: {missing}", pytrace=False)
        pytest.skip(f"multihost tier: {missing}")


def _topology(**kwargs: object) -> Iterator[Topology]:
    require_namespaces()
    try:
        topo = Topology(**kwargs)  # type: ignore[arg-type]
        topo.__enter__()
    except Unavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"multihost tier: {exc}", pytrace=False)
        pytest.skip(f"multihost tier: {exc}")
    try:
        topo.mesh_formed_s = form_mesh_sync(topo)  # type: ignore[attr-defined]
        yield topo
    finally:
        topo.__exit__()


@pytest.fixture(scope="module")
def regions() -> Iterator[Topology]:
    """a (901), b (902), c (903), 2 workers each, meshed; shared by a module's tests, which leave
    the network as they found it."""
    yield from _topology()


@pytest.fixture
def fresh_regions() -> Iterator[Topology]:
    """The same, for one test that may break it (kill -9 a node)."""
    yield from _topology()
