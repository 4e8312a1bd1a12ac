"""The open-relay warning's rule: public listener or public name, and no admission."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.exposure import open_relay_warning


@pytest.mark.parametrize(("env", "listen_host", "warned"), [
    ({}, "127.0.0.1", False),
    ({}, "0.0.0.0", True),
    ({}, "::", True),
    ({}, "192.0.2.1", False),  # documentation range: not global
    ({}, "10.1.2.3", False),
    ({}, "203.0.114.9", True),
    ({"DERP_DOMAIN": "derp.example.com"}, "127.0.0.1", True),
    ({"DERP_DOMAIN": "localhost"}, "127.0.0.1", False),
    ({"DERP_DOMAIN": "derp.example.com", "DERP_VERIFY_CLIENTS": "true"}, "0.0.0.0", False),
    ({"DERP_VERIFY_CLIENT_URL": "https://hs.example.com/verify"}, "0.0.0.0", False),
])
def test_warned_only_when_public_and_open(env: dict[str, str], listen_host: str, warned: bool) -> None:
    assert (open_relay_warning(load_config(None, env).values, listen_host) is not None) is warned
