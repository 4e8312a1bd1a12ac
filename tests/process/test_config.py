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


# -- the supervisor's preflight (cluster/preflight.py): what a worker would refuse, refused once ------


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        ({"server.listen": "127.0.0.1:0"}, "server.listen"),
        ({"limits.http_read_timeout": "0"}, "limits.http_read_timeout"),
        ({"node.dead_after": "0"}, "node.dead_after"),
        ({"limits.max_clients": "-1"}, "limits.max_clients"),
        ({"server.mesh_with": "derper.example"}, "server.mesh_with"),
        ({"admission.verify_client_url": "http://:99999/x"}, "admission.verify_client_url"),
    ],
)
def test_preflight_values_name_the_key(flags: dict[str, str], key: str) -> None:
    from cluster.preflight import check_values

    with pytest.raises(ConfigError) as caught:
        check_values(load_config(flags=flags))
    assert str(caught.value).startswith(f"{key} (") and "\n" not in str(caught.value)


def test_preflight_reads_the_files_workers_read(tmp_path: Path) -> None:
    from cluster.preflight import check_files, read_mesh_key, read_rate_config

    state = {"server.state_dir": str(tmp_path / "state")}
    check_files(load_config(flags=state))  # the defaults pass (and create the server key)
    rates = tmp_path / "rates.json"
    rates.write_text('{"PerClientRateLimitBytesPerSec": 100000, "PerClientRateBurstBytes": 200000}')
    assert read_rate_config(str(rates)) == (100000, 200000)
    rates.write_text("{")
    with pytest.raises(ConfigError, match=r"^limits\.rate_config \(--rate-config\): "):
        check_files(load_config(flags={**state, "limits.rate_config": str(rates)}))
    key = tmp_path / "mesh.key"
    key.write_text("AB" * 32 + "\n")
    assert read_mesh_key(str(key)) == "ab" * 32 and read_mesh_key("") == ""
    key.write_text("ab" * 31)
    with pytest.raises(ConfigError, match=r"^server\.mesh_key_file .*64 hex"):
        check_files(load_config(flags={**state, "server.mesh_key_file": str(key)}))


def test_workers_take_the_supervisors_values_as_they_are() -> None:
    import json

    from cluster.config import trusted_config

    config = load_config(flags={"server.workers": "3", "limits.tcp_user_timeout": "20s"})
    worker = trusted_config(json.loads(json.dumps(config.values)))
    assert worker.values == config.values and worker.limits_tcp_user_timeout == 20.0
    values = dict(config.values)
    del values["server.listen"]
    with pytest.raises(ConfigError, match=r"^server\.listen: missing"):
        trusted_config(values)
