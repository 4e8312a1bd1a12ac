"""Configuration: one table drives TOML keys, DERP_* variables and flags; bad values fail in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import SETTINGS, ConfigError, load_config


def run_up(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "cluster", "up", "--no-stun", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--workers", "many"], None, "--workers"),
        (["--listen", "nowhere"], None, "--listen"),
        (["--certmode", "gcp"], None, "--certmode"),
        (["--region-id", "5"], None, "--region-id"),
        ([], {"DERP_VERIFY_CLIENTS": "perhaps"}, "DERP_VERIFY_CLIENTS"),
        (["--join", "127.0.0.1:7946"], None, "--join"),
    ],
)
def test_bad_settings_exit_nonzero_with_one_line_naming_the_key(args: list[str], env: dict[str, str] | None,
                                                                 names: str) -> None:
    result = run_up(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0]


def test_unknown_toml_key_and_bad_toml(tmp_path: Path) -> None:
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("[server]\nlisten = '127.0.0.1:1'\nworkerz = 2\n")
    with pytest.raises(ConfigError, match=r"server\.workerz"):
        load_config(bad_key)
    broken = tmp_path / "b.toml"
    broken.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_sources_override_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[server]\nworkers = 3\nlisten = '127.0.0.1:4000'\n[stun]\nenabled = false\n")
    config = load_config(toml, {"DERP_WORKERS": "5"}, {"server.listen": "127.0.0.1:5000"})
    assert config.worker_count == 5 and config.listen_addr == ("127.0.0.1", 5000)
    assert config.stun_addr is None
    assert config.sources["server.workers"] == "env:DERP_WORKERS"


def test_every_setting_has_a_default_that_validates() -> None:
    config = load_config()
    for setting in SETTINGS:
        assert setting.key in config.values
    assert config.listen_addr == ("0.0.0.0", 3340) and config.stun_addr == ("0.0.0.0", 3478)
