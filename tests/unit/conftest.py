from __future__ import annotations

import os

import pytest

from relay_worker import fastpath


@pytest.fixture(params=["compiled", "python"])
def hot_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the compiled relay loop (fastpath.py) and on the pure-Python reference.
    Relays built in the test pick the loop named here."""
    if request.param == "compiled":
        if not fastpath.available():
            if os.environ.get("CI") == "true":
                pytest.fail("relay_worker._fastpath was not built (pip install needs a C compiler)")
            pytest.skip("relay_worker._fastpath not built")
        monkeypatch.delenv(fastpath.PURE_PYTHON_ENV, raising=False)
    else:
        monkeypatch.setenv(fastpath.PURE_PYTHON_ENV, "1")
    return str(request.param)
