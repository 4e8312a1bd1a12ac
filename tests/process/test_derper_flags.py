"""derper's command line and the derper images' DERP_* variables, accepted as-is (parity item C10).

Unit tests pin how each of derper's flag forms maps to our settings; the process tests start real
`cluster up` and `derper` (our console script) processes with derper's flags and talk DERP and STUN
to them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster.config import SETTINGS, ConfigError, load_config
from cluster.derper_flags import DERPER_FLAGS, derper_settings, split_derper_args, unknown_derp_env
from relay_worker.client import DerpClient
from relay_worker.keys import PrivateKey
from stun.client import stun_request
from tests.support import ClusterProcess, free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "DERPER-FLAGS.md"


def settings_for(argv: list[str], env: dict[str, str] | None = None, *, derper_mode: bool = False):  # type: ignore[no-untyped-def]
    parsed = split_derper_args(argv, derper_mode=derper_mode)
    flags = derper_settings(parsed, env or {}, derper_mode=derper_mode)
    return load_config(None, env or {}, flags, flag_names=parsed.named), parsed


def test_every_flag_form_of_go_flag_package() -> None:
    config, parsed = settings_for([
        "-a", "127.0.0.1:8443", "--hostname=derp.example.com", "-certmode=manual", "--certdir", "/c",
        "-http-port=-1", "-stun-port", "3479", "-stun=false", "-verify-clients", "-verify-client-url-fail-open=false",
        "-verify-client-url=https://hs.example.com/verify", "-socket=/run/ts.sock", "-derp=false",
        "-home=blank", "-accept-connection-limit=+Inf", "-accept-connection-burst=9223372036854775807",
        "-tcp-user-timeout=15s", "-tcp-keepalive-time=10m", "-tcp-write-timeout=1500ms",
        "-bootstrap-dns-names=a.example.com,b.example.com", "-unpublished-bootstrap-dns-names", "c.example.com",
        "-mesh-psk-file=/k", "-mesh-with=derp1.example.com,derp2.example.com/10.0.0.2", "-c", "/var/lib/x.key",
        "--listen", "127.0.0.1:1",  # one of our own flags passes through untouched
    ])
    v = config.values
    assert parsed.rest == ["--listen", "127.0.0.1:1"]
    assert v["server.listen"] == "127.0.0.1:8443" and v["server.hostname"] == "derp.example.com"
    assert v["server.certmode"] == "manual" and v["server.certdir"] == "/c"
    assert v["server.http_port"] == -1 and v["stun.port"] == 3479 and v["stun.enabled"] is False
    assert v["admission.verify_clients"] is True and v["admission.verify_client_url_fail_open"] is False
    assert v["admission.verify_client_url"] == "https://hs.example.com/verify"
    assert v["admission.tailscaled_socket"] == "/run/ts.sock"
    assert v["server.derp"] is False and v["server.home"] == "blank"
    assert v["limits.accept_connection_limit"] == 0.0 and v["limits.accept_connection_burst"] == 0  # unlimited
    assert (v["limits.tcp_user_timeout"], v["limits.tcp_keepalive_time"]) == (15.0, 600.0)
    assert float(v["limits.tcp_write_timeout"]) == 1.5
    assert v["server.bootstrap_dns_names"] == "a.example.com,b.example.com"  # split by the HTTP edge
    assert v["server.unpublished_bootstrap_dns_names"] == "c.example.com"
    assert v["server.mesh_key_file"] == "/k" and v["server.key_file"] == "/var/lib/x.key"
    assert v["server.mesh_with"] == ["https://derp1.example.com/derp", "https://derp2.example.com/derp#dial=10.0.0.2"]


def test_our_two_dash_stun_stays_ours_and_one_dash_is_derpers() -> None:
    config, parsed = settings_for(["--stun", "127.0.0.1:5000"])
    assert parsed.rest == ["--stun", "127.0.0.1:5000"] and config.values["stun.enabled"] is True
    config, _ = settings_for(["-stun"])
    assert config.values["stun.enabled"] is True


def test_derper_defaults_and_tls_rule_in_derper_mode(tmp_path: Path) -> None:
    key = str(tmp_path / "derper.key")
    config, _ = settings_for(["-c", key, "-certmode=manual", "-hostname=127.0.0.1", "-a=:8443"], derper_mode=True)
    assert config.values["server.certmode"] == "manual"  # manual serves TLS on any port
    config, _ = settings_for(["-c", key, "-a", "127.0.0.2:8080"], derper_mode=True)
    v = config.values
    # derper: letsencrypt (its default) on a port other than 443 serves plain HTTP
    assert v["server.certmode"] == "dev" and v["server.http_port"] == 80 and v["stun.port"] == 3478
    assert v["server.hostname"] == "derp.tailscale.com"
    assert v["stun.listen"] == "127.0.0.2:3478"  # STUN binds to the -a host, as derper's does
    assert config.state_path == tmp_path and config.server_key_path == Path(key)
    config, _ = settings_for(["-c", key], derper_mode=True)
    assert config.values["server.listen"] == ":443" and config.values["server.certmode"] == "letsencrypt"
    config, _ = settings_for(["-c", key, "-dev", "-a", ":443"], derper_mode=True)
    assert config.values["server.listen"] == ":3340" and config.values["server.certmode"] == "dev"


@pytest.mark.parametrize(("argv", "named"), [
    (["-http-port=70000"], "-http-port"),
    (["-stun-port=-1"], "-stun-port"),
    (["-a", "nowhere"], "-a"),
    (["-verify-clients=perhaps"], "-verify-clients"),
    (["-home=ftp://x"], "-home"),
    (["-tcp-user-timeout=soon"], "-tcp-user-timeout"),
    (["-accept-connection-limit=lots"], "-accept-connection-limit"),
    (["-mesh-with=a/b/c"], "-mesh-with"),
    (["-secrets-url=https://setec"], "-secrets-url"),
    (["-ace"], "-ace"),
    (["-certmode=gcp", "-c", "/tmp/k"], "-certmode"),
    (["-hostname"], "-hostname"),
])
def test_bad_derper_values_name_the_flag(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_for(argv, derper_mode=named == "-certmode")
    assert str(info.value).startswith(named), str(info.value)
    assert "\n" not in str(info.value)


def test_derper_mode_refuses_unknown_flags_and_bool_with_space() -> None:
    with pytest.raises(ConfigError, match="flag provided but not defined"):
        split_derper_args(["-bogus"], derper_mode=True)
    with pytest.raises(ConfigError, match=r"-flag=false, not -flag false"):
        split_derper_args(["-verify-clients", "false"], derper_mode=True)


# the environment of the common derper images (fredliang44/derper-docker and its forks)
IMAGE_ENV = {
    "DERP_DOMAIN": "derp.example.com", "DERP_CERT_MODE": "manual", "DERP_CERT_DIR": "/app/certs",
    "DERP_ADDR": ":443", "DERP_STUN": "true", "DERP_STUN_PORT": "3478", "DERP_HTTP_PORT": "80",
    "DERP_VERIFY_CLIENTS": "false", "DERP_VERIFY_CLIENT_URL": "https://hs.example.com/verify",
    "DERP_VERIFY_CLIENT_URL_FAIL_OPEN": "false",
}


def test_every_image_variable_is_read() -> None:
    config = load_config(None, IMAGE_ENV)
    v = config.values
    assert (v["server.hostname"], v["server.certmode"], v["server.certdir"], v["server.listen"]) == \
        ("derp.example.com", "manual", "/app/certs", ":443")
    assert v["stun.enabled"] is True and v["stun.port"] == 3478 and v["server.http_port"] == 80
    assert v["admission.verify_clients"] is False and v["admission.verify_client_url_fail_open"] is False
    assert v["admission.verify_client_url"] == "https://hs.example.com/verify"
    assert unknown_derp_env({**IMAGE_ENV, "DERP_DEV_MODE": "false"}) == []
    assert unknown_derp_env({"DERP_DOMIAN": "typo", "DERP_ADDR": ":443"}) == ["DERP_DOMIAN"]


def test_flag_table_documents_every_derper_flag_and_setting() -> None:
    text = DOC.read_text()
    for flag in DERPER_FLAGS:
        assert f"`-{flag.name}`" in text, flag.name
    for setting in SETTINGS:
        if setting.env:
            assert f"`{setting.env}`" in text, setting.env


# -- real processes ----------------------------------------------------------------------------------


def test_cluster_up_takes_derper_flags_and_uses_the_c_key(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    key_file = tmp_path / "derper.key"
    key_file.write_text(json.dumps({"PrivateKey": key.text()}))
    stun_port = free_port(socket.SOCK_DGRAM)
    node = ClusterProcess("-c", str(key_file), "-stun=true", f"-stun-port={stun_port}", "-verify-clients=false",
                          "-http-port=-1", "-accept-connection-limit=+Inf", env={"DERP_NOT_A_THING": "1"})

    def command() -> list[str]:  # our own --no-stun would turn STUN off; derper's flags decide here
        return [c for c in ClusterProcess.command(node) if c != "--no-stun"] + ["--stun", "127.0.0.1:0"]

    node.command = command  # type: ignore[method-assign]
    with node:
        async_check(node.url, key)
        result = asyncio_run(stun_request("127.0.0.1", stun_port, timeout=2.0))
        assert result.ip == "127.0.0.1"
    assert any("DERP_NOT_A_THING is not a variable this relay reads" in line for line in node.output)


class DerperProcess(ClusterProcess):
    """Our `derper` console script, run with nothing but derper's own flags."""

    def __init__(self, *derper_args: str) -> None:
        super().__init__()
        self.derper_args = list(derper_args)
        self.run_dir = Path(self.tmp.name) / "run"

    def command(self) -> list[str]:
        return [sys.executable, "-c", "from cluster.cli import derper_main; derper_main()", *self.derper_args]


def test_derper_entry_point_is_a_drop_in(tmp_path: Path) -> None:
    state = Path(tempfile.mkdtemp(prefix="derper-", dir="/tmp"))
    key = PrivateKey.generate()
    (state / "derper.key").write_text(json.dumps({"PrivateKey": key.text()}))
    port, stun_port = free_port(), free_port(socket.SOCK_DGRAM)
    # derper's rule: -certmode letsencrypt (the default) on a port other than 443 is plain HTTP
    node = DerperProcess("-a", f"127.0.0.1:{port}", "-c", str(state / "derper.key"), f"--stun-port={stun_port}",
                         "-hostname=derp.example.com")
    node.port = port
    node.run_dir = state / "run"
    try:
        with node:
            async_check(node.url, key)
            result = asyncio_run(stun_request("127.0.0.1", stun_port, timeout=2.0))
            assert result.ip == "127.0.0.1"
    finally:
        shutil.rmtree(state / "run", ignore_errors=True)
    bad = subprocess.run([sys.executable, "-c", "from cluster.cli import derper_main; derper_main()",
                          "-c", str(state / "derper.key"), "-http-port=70000"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("cluster: config error: -http-port (server.http_port): 70000 is not a port")
    shutil.rmtree(state, ignore_errors=True)


def asyncio_run(coro):  # type: ignore[no-untyped-def]
    import asyncio

    return asyncio.run(coro)


def async_check(url: str, server_key: PrivateKey) -> None:
    async def go() -> None:
        client = await DerpClient.connect(url)
        try:
            assert client.server_public == server_key.public().raw  # the -c file's key
        finally:
            await client.close()

    asyncio_run(go())


@pytest.mark.parametrize(("args", "named"), [
    (["-http-port=70000"], "-http-port"),
    (["-stun-port=-1"], "-stun-port"),
    (["--listen", "127.0.0.1:70000"], "--listen"),
    (["--state-dir", "/proc/version/sub"], "server.state_dir"),
    (["-verify-clients", "-socket=/nonexistent/tailscaled.sock"], "admission.tailscaled_socket"),
    (["-mesh-with=derp1.example.com"], "server.mesh_with"),
    (["-mesh-psk-file=/nonexistent"], "server.mesh_key_file"),
    (["--client-bytes-per-second", "-5"], "limits.bytes_per_second"),
    (["-verify-client-url=http://:80/x"], "admission.verify_client_url"),
    (["-c", "/etc/hostname"], "server.key_file"),  # exists, is not derper's key JSON
    (["-home=gopher://x"], "-home"),
    (["-certmode=letsencrypt", "-hostname=203.0.113.9", "-http-port=8080"], "server.hostname"),
    (["-certmode=manual", "-hostname=127.0.0.1", "-acme-ip-certs"], "server.acme_ip_certs"),
    (["-certmode=letsencrypt", "-hostname=203.0.113.9", "-acme-ip-certs", "-http-port=-1"], "server.http_port"),
])
def test_bad_values_exit_2_with_one_line(args: list[str], named: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cluster", "up", "--no-stun", "--listen",
                             f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "s"), *args],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert named in line and "Traceback" not in line


def test_admin_token_never_on_a_command_line() -> None:
    secret = "tok-" + os.urandom(8).hex()
    with ClusterProcess(env={"DERP_ADMIN_TOKEN": secret}, workers=2) as node:
        pids = node.worker_pids()
        assert len(pids) == 2
        for pid in [node.proc.pid, *pids]:  # type: ignore[union-attr]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert secret.encode() not in cmdline
        token_file = node.run_dir / "admin-token"
        assert token_file.read_text().strip() == secret
        assert token_file.stat().st_mode & 0o077 == 0


def test_derpmap_offline_from_derper_flags_with_the_ip_cert_pin(tmp_path: Path) -> None:
    from cluster.tls import cert_pin

    certdir = tmp_path / "certs"
    args = ["-a", "127.0.0.1:8443", "-hostname", "127.0.0.1", "-certmode=manual", "-certdir", str(certdir),
            "-stun-port=3479", "--state-dir", str(tmp_path / "state")]
    out = subprocess.run([sys.executable, "-m", "cluster", "derpmap", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    (node,) = json.loads(out.stdout)["Regions"]["900"]["Nodes"]
    assert (node["HostName"], node["IPv4"], node["DERPPort"], node["STUNPort"]) == ("127.0.0.1", "127.0.0.1", 8443,
                                                                                   3479)
    assert node["CertName"] == cert_pin(certdir / "127.0.0.1.crt")  # derper's own self-signed IP cert
    hs = subprocess.run([sys.executable, "-m", "cluster", "derpmap", "--format", "headscale", *args],
                        capture_output=True, text=True, timeout=60)
    assert hs.returncode == 0 and f'certname: "{node["CertName"]}"' in hs.stdout, hs.stdout


def test_mesh_with_derpers_host_slash_dialhost_form(tmp_path: Path) -> None:
    """derper's -mesh-with HOST/DIALHOST: dial DIALHOST, check TLS (and SNI) against HOST."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("derp-b.test")
    certdir = tmp_path / "certs"
    certdir.mkdir()
    (certdir / "derp-b.test.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (certdir / "derp-b.test.key").write_bytes(leaf.private_key_pem.bytes())
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    mesh_key = tmp_path / "mesh.key"
    mesh_key.write_text(os.urandom(32).hex() + "\n")
    b = ClusterProcess("-certmode=manual", "-hostname=derp-b.test", f"-certdir={certdir}",
                       f"-mesh-psk-file={mesh_key}")
    with b, ClusterProcess(f"-mesh-with=derp-b.test:{b.port}/127.0.0.1", f"-mesh-psk-file={mesh_key}",
                           env={"SSL_CERT_FILE": str(ca_pem)}) as a:
        async def relay() -> None:
            import ssl as ssl_mod

            from tests.support import await_until

            ctx = ssl_mod.create_default_context(cafile=str(ca_pem))
            on_b = await DerpClient.connect(f"https://127.0.0.1:{b.port}/derp", ssl_context=ctx,
                                            server_hostname="derp-b.test")
            on_a = await DerpClient.connect(a.url)
            try:
                await await_until(lambda: any(d["connected"] and d["keys"] for d in
                                              a.varz()["mesh"]["derpers"]), timeout=20,
                                  what="a to mesh with b through the dial host")
                await on_a.send(on_b.public_key, b"a to b via derper's mesh")
                got = await on_b.recv_packet(timeout=5)
                assert got.src == on_a.public_key and got.data == b"a to b via derper's mesh"
            finally:
                await on_a.close()
                await on_b.close()

        asyncio_run(relay())
        (derper,) = a.varz()["mesh"]["derpers"]
        assert "derp-b.test" in json.dumps(derper)


def test_rate_config_is_derpers_file() -> None:
    config, _ = settings_for(["-rate-config=/etc/derper/rate.json"])
    assert config.values["limits.rate_config"] == "/etc/derper/rate.json"


def test_tcp_timeouts_from_derper_flags_reach_the_listening_socket() -> None:
    import socket

    from relay_worker.server import make_listen_socket

    values = settings_for(["-tcp-user-timeout=5s", "-tcp-keepalive-time=3m"])[0].values
    sock = make_listen_socket("127.0.0.1", 0, user_timeout=values["limits.tcp_user_timeout"],
                              keepalive_idle=values["limits.tcp_keepalive_time"])
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 5000
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 180
    finally:
        sock.close()
