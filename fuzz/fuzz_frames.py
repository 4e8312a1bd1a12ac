#!/usr/bin/env python3
"""atheris harness for the DERP wire codec: the incremental FrameParser fed in arbitrary chunks,
every payload parser on every frame, and the handshake's ClientInfo (box and JSON).

Run by hand (see docs/FUZZING.md):
    .venv/bin/python fuzz/fuzz_frames.py -max_total_time=600 [CORPUS_DIR ...]
`--seed-corpus DIR` writes a few well-formed inputs into DIR first.

The contract checked: bytes from the network either parse or raise `ProtocolError` (the caller
closes the connection); anything else escaping is a crash. The parser buffers at most one
incomplete frame, and what it returns plus what it buffers accounts for every byte fed.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from pathlib import Path

# Run as a script, the repository root is not on the path; the imports below need it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Under atheris, instrument only the code under test as it is imported: instrumenting everything
# already loaded (atheris.instrument_all) costs ~20 s of start-up and slows every input.
_instrumented: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
if __name__ == "__main__":
    import atheris

    _instrumented = atheris.instrument_imports(include=["relay_worker"])
with _instrumented:
    from nacl.public import Box
    from nacl.public import PublicKey as NaclPublicKey

    from relay_worker import frames as F
    from relay_worker.client import decode_event
    from relay_worker.handshake import ClientInfo, ServerInfo, open_client_info, seal_client_info
    from relay_worker.keys import PrivateKey

# Fixed keys: the fuzzer needs deterministic behaviour for a given input.
SERVER = PrivateKey(bytes(range(1, 33)))
CLIENT = PrivateKey(bytes(range(33, 65)))
LIMITS = (F.MAX_INFO_LEN, F.MAX_FRAME_LEN, 1024, 0)

PAYLOAD_PARSERS = (
    F.parse_server_key, F.parse_client_info, F.parse_server_info, F.parse_send_packet, F.parse_recv_packet,
    F.parse_forward_packet, F.parse_note_preferred, F.parse_peer_gone, F.parse_peer_present,
    F.parse_close_peer, F.parse_ping, F.parse_pong, F.parse_restarting, F.parse_health,
)

#: Exceptions from known, reported bugs that the harness tolerates so that it keeps looking for new
#: ones while a fix is pending (each with a strict-xfail regression test in tests/process/test_fuzz_atheris.py).
#: Empty today: the bugs found so far are fixed and their tests are plain regression tests.
KNOWN_BUGS: dict[str, tuple[type[BaseException], ...]] = {
    # none open: RecursionError and ServerInfo type errors were fixed (regression tests in
    # tests/process/test_fuzz_atheris.py and tests/unit/test_fuzz_stateful.py)
    "ClientInfo.from_json": (),
    "ServerInfo.from_json": (),
}


def _split(data: bytes) -> tuple[int, list[int], bytes]:
    """First byte picks the parser limit, the next four the chunk sizes (1..256), the rest is the stream."""
    if not data:
        return F.MAX_INFO_LEN, [], b""
    limit = LIMITS[data[0] % len(LIMITS)]
    sizes = [b + 1 for b in data[1:5]]
    return limit, sizes, data[5:]


def check_parser(data: bytes) -> list[tuple[int, bytes]]:
    # payloads may be memoryviews (zero-copy); they are copied to bytes once here
    limit, sizes, stream = _split(data)
    parser = F.FrameParser(limit)
    frames: list[tuple[int, bytes]] = []
    pos = 0
    turn = 0
    while pos < len(stream):
        size = sizes[turn % len(sizes)] if sizes else len(stream)
        chunk = stream[pos : pos + size]
        pos += len(chunk)
        turn += 1
        try:
            frames.extend((t, bytes(p)) for t, p in parser.feed(chunk))
        except F.ProtocolError:
            return frames  # the connection would be closed here
        consumed = sum(F.HEADER_LEN + len(p) for _, p in frames)
        if consumed + parser.buffered() != pos:
            raise AssertionError(f"parser lost bytes: {consumed} framed + {parser.buffered()} buffered != {pos}")
        if parser.buffered() >= F.HEADER_LEN + limit:
            raise AssertionError(f"parser buffers {parser.buffered()} bytes with limit {limit}")
    for _, payload in frames:
        if len(payload) > limit:
            raise AssertionError("parser returned a frame over its limit")
    return frames


def check_payloads(frames: list[tuple[int, bytes]]) -> None:
    for frame_type, payload in frames:
        for parse in PAYLOAD_PARSERS:
            with contextlib.suppress(F.ProtocolError):
                parse(payload)
        with contextlib.suppress(F.ProtocolError):
            decode_event(frame_type, payload)
        # the JSON parsers get what a box opens to, which is bytes
        with contextlib.suppress(F.ProtocolError, *KNOWN_BUGS["ClientInfo.from_json"]):
            ClientInfo.from_json(bytes(payload))
        with contextlib.suppress(F.ProtocolError, *KNOWN_BUGS["ServerInfo.from_json"]):
            ServerInfo.from_json(bytes(payload))
        F.looks_like_disco(payload)


def check_client_info(data: bytes) -> None:
    """The input as the plaintext of a correctly sealed ClientInfo: reaches the JSON handling that a
    client holding any key can feed the server."""
    nonce = bytes(24)  # fixed: the fuzzer needs the same input to behave the same
    sealed = Box(CLIENT.nacl(), NaclPublicKey(SERVER.public().raw)).encrypt(data, nonce).ciphertext
    try:
        key, info = open_client_info(SERVER, CLIENT.public().raw + nonce + sealed)
    except (F.ProtocolError, *KNOWN_BUGS["ClientInfo.from_json"]):
        return
    if key != CLIENT.public().raw or not isinstance(info.mesh_key, str) or not isinstance(info.version, int):
        raise AssertionError("ClientInfo accepted with fields of the wrong type")


def one_input(data: bytes) -> None:
    frames = check_parser(data)
    check_payloads(frames)
    check_client_info(data)


def seeds() -> list[bytes]:
    """Well-formed starting points: a handshake, packets, pings, mesh frames, one per limit."""
    key = bytes(range(32))
    stream = (
        seal_client_info(CLIENT, SERVER.public().raw, ClientInfo(can_ack_pings=True))
        + F.build_send_packet(key, b"hello")
        + F.build_send_packet(key, F.DISCO_MAGIC + bytes(70))
        + F.build_ping(b"12345678")
        + F.build_note_preferred(True)
        + F.build_forward_packet(key, key, b"fwd")
        + F.WATCH_CONNS_FRAME
        + F.build_close_peer(key)
        + F.build_peer_present(key, bytes(16), 41641, 1)
        + F.build_peer_gone(key, 1)
        + F.build_restarting(1000, 30000)
        + F.build_health("dup")
        + F.build_frame(0x7E, b"future")
    )
    out = [bytes([i, 7, 31, 2, 200]) + stream for i in range(len(LIMITS))]
    out.append(b'{"version":2,"meshKey":"' + b"ab" * 32 + b'","CanAckPings":true}')
    out.append(bytes([0, 255, 255, 255, 255]) + struct.pack(">BI", F.SEND_PACKET, 0xFFFFFFFF))
    return out


def main(argv: list[str]) -> None:
    from fuzz._harness import run

    run(argv, one_input, seeds)


if __name__ == "__main__":
    main(sys.argv)
