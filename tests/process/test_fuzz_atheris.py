"""The atheris harnesses (fuzz/): a bounded coverage-guided run of each in CI, their seeds replayed
without atheris, and the inputs that broke the codec kept as plain-bytes regression tests.

Longer runs by hand: docs/FUZZING.md.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.public import Box
from nacl.public import PublicKey as NaclPublicKey

from fuzz import fuzz_frames, fuzz_stun
from relay_worker import frames as F
from relay_worker.handshake import ClientInfo, ServerInfo, open_client_info
from relay_worker.keys import PrivateKey

ROOT = Path(__file__).resolve().parents[2]
#: seconds of fuzzing per harness in CI: enough for a few hundred thousand inputs on one core
CI_SECONDS = 15

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
needs_atheris = pytest.mark.skipif(
    not HAVE_ATHERIS,
    reason="atheris is not installed in this venv (`.venv/bin/pip install atheris`; PyPI has wheels for "
    "CPython 3.11 on x86_64 Linux, other platforms build it from source against libFuzzer/clang)",
)


@needs_atheris
@pytest.mark.slow
@pytest.mark.parametrize("harness", ["fuzz_frames", "fuzz_stun"])
def test_harness_finds_nothing_in_a_bounded_run(harness: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    cmd = [sys.executable, str(ROOT / "fuzz" / f"{harness}.py"), "--seed-corpus", str(corpus), str(corpus),
           f"-max_total_time={CI_SECONDS}", f"-artifact_prefix={tmp_path}/", "-timeout=10", "-rss_limit_mb=2048",
           "-print_final_stats=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=CI_SECONDS + 60, cwd=tmp_path)
    artifacts = sorted(p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    found = "\n".join(f"{p.name}: {p.read_bytes()!r}" for p in artifacts)
    assert result.returncode == 0 and not artifacts, (
        f"{harness} found a failing input; add it to REGRESSIONS below as plain bytes:\n{found}\n"
        + result.stderr[-3000:]
    )
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", result.stderr)
    assert runs is not None and int(runs.group(1)) > 10_000, result.stderr[-2000:]
    print(f"{harness}: {runs.group(1)} inputs in {CI_SECONDS}s, no failure")


# -- without atheris: the harnesses' own logic on their seeds and on past findings ---------------------

#: inputs that once made a harness fail (or that probe a bug found while writing them); each is
#: replayed through the harness on every test run
REGRESSIONS: dict[str, list[bytes]] = {
    "fuzz_frames": [
        b"[" * 5000,  # deep JSON as a ClientInfo plaintext (a fixed bug; see below)
        b'{"version":[]}',  # as a ServerInfo payload (a fixed bug; see below)
        bytes([0, 1, 1, 1, 1]) + F.frame_header(F.SEND_PACKET, 0xFFFFFFFF),  # 4 GiB length, 1-byte chunks
        bytes([3, 255, 255, 255, 255]) + F.frame_header(F.PING, 1),  # limit 0: any payload is over it
    ],
    "fuzz_stun": [
        b"\x00\x01\x00\x08!\x12\xa4B" + bytes(12) + b"\x80(\x00\x04\x00\x00\x00\x00",  # FINGERPRINT, wrong CRC
        b"\x01\x01\x00\x0c!\x12\xa4B" + bytes(12) + b"\x00\x20\x00\x08\x00\x03\x00\x00\x00\x00\x00\x00",  # bad family
    ],
}


@pytest.mark.parametrize("harness", [fuzz_frames, fuzz_stun], ids=["fuzz_frames", "fuzz_stun"])
def test_harness_seeds_and_regressions_pass(harness: object) -> None:
    name = harness.__name__.rsplit(".", 1)[-1]  # type: ignore[attr-defined]
    for data in [*harness.seeds(), *REGRESSIONS[name]]:  # type: ignore[attr-defined]
        harness.one_input(data)  # type: ignore[attr-defined]


def test_frames_harness_checks_something() -> None:
    # the harness must reject a parser that loses bytes: feed it a parser stub that drops a frame
    class Lossy(F.FrameParser):
        def feed(self, data: bytes) -> list[tuple[int, bytes]]:
            return super().feed(data)[1:]

    original = fuzz_frames.F.FrameParser
    fuzz_frames.F.FrameParser = Lossy  # type: ignore[misc]
    try:
        with pytest.raises(AssertionError, match="lost bytes"):
            fuzz_frames.one_input(bytes([0, 255, 255, 255, 255]) + F.build_frame(1, b"a") + F.build_frame(2, b"b"))
    finally:
        fuzz_frames.F.FrameParser = original  # type: ignore[misc]


# -- bugs found while building the harnesses (fixed; regression tests) ----------------------------------

SERVER = PrivateKey(bytes(range(1, 33)))
CLIENT = PrivateKey(bytes(range(33, 65)))


def _sealed_client_info(plaintext: bytes) -> bytes:
    nonce = bytes(F.NONCE_LEN)
    sealed = Box(CLIENT.nacl(), NaclPublicKey(SERVER.public().raw)).encrypt(plaintext, nonce).ciphertext
    return CLIENT.public().raw + nonce + sealed


def test_deeply_nested_client_info_json_is_a_protocol_error() -> None:
    # Reachable by any client before authentication: the box only proves it holds its own key.
    with pytest.raises(F.ProtocolError):
        open_client_info(SERVER, _sealed_client_info(b"[" * 100_000))


@pytest.mark.parametrize("raw", [b'{"version":[]}', b'{"version":1e999}', b'{"version":"x"}',
                                 b'{"TokenBucketBytesBurst":null}', b"[" * 100_000])
def test_malformed_server_info_json_is_a_protocol_error(raw: bytes) -> None:
    # The client side (DerpClient, used by the derper mesh peering and the prober): a hostile server,
    # or anyone in the middle of a plain-HTTP --mesh-with link, chooses this JSON.
    with pytest.raises(F.ProtocolError):
        ServerInfo.from_json(raw)


def test_client_info_json_of_the_wrong_shape_is_a_protocol_error() -> None:
    for raw in (b"", b"null", b"[]", b'"x"', b'{"version":"2"}', b'{"meshKey":5}', b"\xff\xfe", b"1" * 5000):
        with pytest.raises(F.ProtocolError):
            ClientInfo.from_json(raw)
