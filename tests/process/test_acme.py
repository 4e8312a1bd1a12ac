"""certmode letsencrypt against a real ACME server: Let's Encrypt's pebble on loopback.

pebble validates HTTP-01 by fetching http://localhost:<our http port>/.well-known/acme-challenge/…
from the cluster's workers, issues from its own (per-run) root, and is set to a short certificate
lifetime so the renewal and the hot swap happen within the test.

pebble is a Go program: the test uses `pebble` from PATH or ~/go/bin, or builds it with
`GOFLAGS=-mod=mod go install github.com/letsencrypt/pebble/v2/cmd/pebble@v2.10.3`. Without Go the
test is skipped with one line, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from cluster.ip_certs import SHORTLIVED_PROFILE
from relay_worker.client import DerpClient, DerpClientError
from tests.support import ClusterProcess, free_port, wait_until

pytestmark = pytest.mark.slow

PEBBLE_VERSION = "v2.10.3"
PEBBLE_MODULE = "github.com/letsencrypt/pebble/v2"
CERT_LIFETIME = 30  # seconds: renewal (at a third left) comes after ~20 s


def _gopath() -> Path:
    try:
        out = subprocess.run(["go", "env", "GOPATH"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return Path(out or Path.home() / "go")


def pebble_binary() -> Path:
    found = shutil.which("pebble")
    if found:
        return Path(found)
    have_go = shutil.which("go") is not None
    binary = _gopath() / "bin" / "pebble"
    if binary.exists():
        return binary
    if not have_go:
        if os.environ.get("CI") == "true":
            pytest.fail("pebble is needed for the ACME test and Go is not installed to build it")
        pytest.skip("ACME test needs pebble (no Go toolchain to build it)")
    build = subprocess.run(["go", "install", f"{PEBBLE_MODULE}/cmd/pebble@{PEBBLE_VERSION}"],
                           capture_output=True, text=True, timeout=900, env={**os.environ, "GOFLAGS": "-mod=mod"})
    assert build.returncode == 0, f"building pebble failed:\n{build.stderr[-2000:]}"
    assert binary.exists()
    return binary


def pebble_test_certs() -> Path:
    return _gopath() / "pkg" / "mod" / f"{PEBBLE_MODULE.replace('/v2', '')}/v2@{PEBBLE_VERSION}" / "test" / "certs"


def start_pebble(tmp_path: Path, *, tls_port: int | None = None, shortlived: bool = False
                 ) -> Iterator[dict[str, object]]:
    """pebble on loopback; its TLS-ALPN-01 checks go to tls_port (a port nobody listens on if None).
    shortlived adds the profile derper's -acme-ip-certs orders (Let's Encrypt's: about six days; an
    hour here), only where asked for: pebble gives an order that names no profile a random one."""
    binary = pebble_binary()
    certs = pebble_test_certs()
    assert (certs / "pebble.minica.pem").exists(), f"pebble's test certs not found under {certs}"
    acme_port, mgmt_port, http_port = free_port(), free_port(), free_port()
    config = {"pebble": {
        "listenAddress": f"127.0.0.1:{acme_port}", "managementListenAddress": f"127.0.0.1:{mgmt_port}",
        "certificate": str(certs / "localhost" / "cert.pem"), "privateKey": str(certs / "localhost" / "key.pem"),
        "httpPort": http_port, "tlsPort": tls_port or free_port(), "ocspResponderURL": "",
        "externalAccountBindingRequired": False, "retryAfter": {"authz": 1, "order": 1}, "keyAlgorithm": "ecdsa",
        "profiles": {"default": {"description": "short, for the renewal test", "validityPeriod": CERT_LIFETIME},
                     **({SHORTLIVED_PROFILE: {"description": "IP certificates", "validityPeriod": 3600}}
                        if shortlived else {})},
    }}
    config_file = tmp_path / "pebble.json"
    config_file.write_text(json.dumps(config))
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
    log = open(tmp_path / "pebble.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(binary), "-config", str(config_file)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    ca = ssl.create_default_context(cafile=str(certs / "pebble.minica.pem"))

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"https://localhost:{acme_port}/dir", context=ca, timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return proc.poll() is not None

    try:
        wait_until(up, timeout=30, what="pebble to answer")
        assert proc.poll() is None, (tmp_path / "pebble.log").read_text()
        yield {"directory": f"https://localhost:{acme_port}/dir", "ca_file": str(certs / "pebble.minica.pem"),
               "http_port": http_port, "mgmt": f"https://localhost:{mgmt_port}", "ca": ca,
               "log": tmp_path / "pebble.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[dict[str, object]]:
    """pebble whose TLS-ALPN-01 checks find nobody listening: a certificate comes over HTTP-01 only."""
    yield from start_pebble(tmp_path)


def pebble_root(pebble: dict[str, object]) -> str:
    """The root of this pebble run, which its chains lead to."""
    with urllib.request.urlopen(f"{pebble['mgmt']}/roots/0", context=pebble["ca"], timeout=5) as answer:
        return str(answer.read().decode())


def served_chain_leaf(port: int, server_name: str | None) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def derp_connects(port: int, trust: ssl.SSLContext, server_hostname: str) -> None:
    """A real DERP client over the issued certificate, on whichever worker takes each connection:
    each worker picks a new pair up on its own, so until all have, one may still serve the old."""
    async def derp_over_tls() -> None:
        client = await DerpClient.connect(f"https://127.0.0.1:{port}/derp", ssl_context=trust,
                                          server_hostname=server_hostname)
        await client.close()

    def works() -> bool:
        try:
            asyncio.run(derp_over_tls())
        except DerpClientError:
            return False
        return True

    for _ in range(4):  # more than one connection: with two workers, both get to answer
        wait_until(works, timeout=15, interval=0.2, what="DERP over the issued certificate")


def test_letsencrypt_issues_over_http01_renews_and_hot_swaps(pebble: dict[str, object]) -> None:
    """TLS-ALPN-01 (preferred, as autocert) fails here, so every order falls back to HTTP-01."""
    certdir = Path(tempfile.mkdtemp(prefix="acme-certs-"))
    node = ClusterProcess("--certmode", "letsencrypt", "--hostname", "localhost", "--certdir", str(certdir),
                          "--http-port", str(pebble["http_port"]), "--acme-directory", str(pebble["directory"]),
                          "--acme-ca-file", str(pebble["ca_file"]), "--acme-email", "ops@example.com", workers=2)
    try:
        with node:
            pids = node.worker_pids()

            def issued() -> x509.Certificate | None:
                leaf = served_chain_leaf(node.port, "localhost")
                return leaf if leaf.issuer != leaf.subject else None  # the placeholder is self-signed

            first = wait_until(issued, timeout=90, what="the ACME certificate to be served")
            # pebble's chain: leaf, intermediate; the root is what clients trust
            with urllib.request.urlopen(f"{pebble['mgmt']}/intermediates/0", context=pebble["ca"], timeout=5) as ans:
                assert ans.status == 200
            # it chains to pebble's root of this run, for the name we asked for
            derp_connects(node.port, ssl.create_default_context(cadata=pebble_root(pebble)), "localhost")
            sans = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
            # cached in the cert dir under derper's file names
            assert (certdir / "localhost.crt").exists() and (certdir / "localhost.key").stat().st_mode & 0o077 == 0
            assert (certdir / "acme_account+key").exists()

            # renewal before expiry, served by the same worker processes (hot swap, no restart)
            # (each worker picks up a new file on its own: until every one has, a connection may still
            # meet the placeholder, which is no renewal)
            renewed = wait_until(lambda: (leaf := issued()) is not None and leaf.serial_number
                                 != first.serial_number and leaf, timeout=90, what="the renewed certificate")
            assert renewed.not_valid_after_utc > first.not_valid_after_utc
            assert node.worker_pids() == pids

            # derper's autocert host policy: another SNI gets no certificate
            with pytest.raises(ssl.SSLError):
                served_chain_leaf(node.port, "other.example")
    finally:
        shutil.rmtree(certdir, ignore_errors=True)


def test_letsencrypt_issues_over_tls_alpn01_alone(tmp_path: Path) -> None:
    """The plain-HTTP port is off (-http-port -1) and pebble's HTTP-01 port has nobody behind it:
    the certificate can only come from the DERP port answering TLS-ALPN-01 (RFC 8737)."""
    port = free_port()
    pebble = next(pebble_run := start_pebble(tmp_path, tls_port=port))
    certdir = tmp_path / "certs"
    node = ClusterProcess("--certmode", "letsencrypt", "--hostname", "localhost", "--certdir", str(certdir),
                          "--http-port", "-1", "--acme-directory", str(pebble["directory"]),
                          "--acme-ca-file", str(pebble["ca_file"]), port=port, workers=2)
    try:
        with node:
            def issued() -> x509.Certificate | None:
                leaf = served_chain_leaf(node.port, "localhost")
                return leaf if leaf.issuer != leaf.subject else None

            leaf = wait_until(issued, timeout=90, what="the ACME certificate to be served")
            assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                .get_values_for_type(x509.DNSName) == ["localhost"]

            # a real DERP client over the issued certificate: the ClientHello reader let it through
            derp_connects(node.port, ssl.create_default_context(cadata=pebble_root(pebble)), "localhost")

            # acme-tls/1 with no challenge pending: refused, as autocert refuses it
            acme_only = ssl.create_default_context(cadata=pebble_root(pebble))
            acme_only.set_alpn_protocols(["acme-tls/1"])
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as raw, \
                    pytest.raises((ssl.SSLError, OSError)):
                acme_only.wrap_socket(raw, server_hostname="localhost")
    finally:
        pebble_run.close()


def test_acme_ip_certs_for_a_client_connecting_by_ip(tmp_path: Path) -> None:
    """derper v1.102's -acme-ip-certs on an IP-only node: a client that connects to 127.0.0.1 (no
    SNI) gets a certificate for that address (RFC 8738 IP identifier, the short-lived profile) over
    HTTP-01; pebble's TLS-ALPN-01 port has nobody behind it."""
    pebble_run = start_pebble(tmp_path, shortlived=True)
    pebble = next(pebble_run)
    certdir = tmp_path / "certs"
    node = ClusterProcess("-certmode=letsencrypt", "-hostname=127.0.0.1", "-acme-ip-certs", "--certdir", str(certdir),
                          "--http-port", str(pebble["http_port"]), "--acme-directory", str(pebble["directory"]),
                          "--acme-ca-file", str(pebble["ca_file"]), workers=2)
    try:
        with node:
            def issued() -> x509.Certificate | None:
                try:  # refused until the certificate is there: the worker asked the supervisor for it
                    leaf = served_chain_leaf(node.port, None)
                except (ssl.SSLError, OSError):
                    return None
                return leaf if leaf.issuer != leaf.subject else None

            leaf = wait_until(issued, timeout=90, interval=0.5, what="the ACME IP certificate to be served")
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
            assert sans.get_values_for_type(x509.DNSName) == []
            # the short-lived profile (an hour here), not the default one (30 s)
            assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() > 600
            # derper's file names in the cert dir
            assert (certdir / "127.0.0.1.key").stat().st_mode & 0o077 == 0
            assert (certdir / "acme-account.key").exists()

            derp_connects(node.port, ssl.create_default_context(cadata=pebble_root(pebble)), "127.0.0.1")
            # an IP-only node has no certificate for a DNS name (derper: "only serves IP address certificates")
            with pytest.raises((ssl.SSLError, OSError)):
                served_chain_leaf(node.port, "localhost")
    finally:
        pebble_run.close()
