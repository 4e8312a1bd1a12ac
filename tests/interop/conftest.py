"""The interop tier: Tailscale's own programs (built from the tailscale.com version go.mod pins)
against our cluster, each test in a network namespace of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.interop.harness import InteropUnavailable, NetNS, build_binaries, workdir

_build: Path | InteropUnavailable | None = None


@pytest.fixture(scope="session")
def bins() -> Path:
    """Tailscale's programs and ours, built once per session; a missing Go is a skip, or under CI a failure."""
    global _build
    if _build is None:
        try:
            _build = build_binaries()
            if os.geteuid() != 0:
                raise InteropUnavailable("not root: the interop tier creates network namespaces")
        except InteropUnavailable as exc:
            _build = exc
    if isinstance(_build, InteropUnavailable):
        if os.environ.get("CI") == "true":
            pytest.fail(f"interop tier: {_build}", pytrace=False)
        pytest.skip(f"interop tier: {_build}")
    return _build


@pytest.fixture
def tmp_work() -> Iterator[Path]:
    with workdir("derp-interop-") as path:
        yield path


@pytest.fixture
def ns(bins: Path, tmp_work: Path) -> Iterator[NetNS]:
    with NetNS(tmp_work) as namespace:
        yield namespace


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_files(ca: trustme.CA, where: Path, hostname: str) -> Path:
    """A cert dir holding HOSTNAME.crt/.key, as derper's manual mode wants them; returns the dir."""
    certdir = where / f"certs-{hostname}"
    certdir.mkdir(exist_ok=True)
    cert = ca.issue_cert(hostname)
    cert.private_key_pem.write_to_path(certdir / f"{hostname}.key")
    (certdir / f"{hostname}.crt").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return certdir


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_work: Path) -> Path:
    path = tmp_work / "ca.pem"
    ca.cert_pem.write_to_path(path)
    return path
