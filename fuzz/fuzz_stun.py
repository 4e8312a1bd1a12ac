#!/usr/bin/env python3
"""atheris harness for the STUN codec (stun/codec.py): the server's classifier and responder and
the client's response parser, on arbitrary datagrams.

Run by hand (see docs/FUZZING.md):
    .venv/bin/python fuzz/fuzz_stun.py -max_total_time=600 [CORPUS_DIR ...]
`--seed-corpus DIR` writes a few well-formed datagrams into DIR first.

The contract checked (the codec's own docstring): nothing raises on any input; only a well-formed
Binding request gets an answer; an answer is never larger than the request plus the two address
attributes (no amplification), echoes the transaction id and carries the address it was asked
about; and the client's parser reads back exactly that address.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

# Run as a script, the repository root is not on the path; the imports below need it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Under atheris, instrument only the code under test as it is imported (instrument_all would also
# walk everything already loaded, which costs seconds of start-up and speed on every input).
_instrumented: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
if __name__ == "__main__":
    import atheris

    _instrumented = atheris.instrument_imports(include=["stun"])
with _instrumented:
    from stun import codec as S

# (ip, port) pairs the responder is asked to report: both families, a v4-mapped v6 and a scope id
ADDRESSES = (
    ("203.0.113.7", 41641),
    ("2001:db8::1", 3478),
    ("::ffff:198.51.100.9", 1),
    ("fe80::1%eth0", 65535),
)
SOFTWARE = (None, "derp-cluster", "x" * 800)


def one_input(data: bytes) -> None:
    request = S.classify_request(data)
    header = S.parse_header(data)
    if isinstance(request, S.BindingRequest):
        # accepted only if it really is a Binding request with a good header
        if isinstance(header, S.DropReason) or header.msg_type != S.BINDING_REQUEST:
            raise AssertionError("classify_request accepted a datagram that is not a Binding request")
        if request.size != len(data) or request.transaction_id != data[8:20]:
            raise AssertionError("classify_request misreports the request")
    elif not isinstance(request, S.DropReason):
        raise AssertionError(f"classify_request returned {request!r}")
    selector = data[-1] if data else 0
    ip, port = ADDRESSES[selector % len(ADDRESSES)]
    software = SOFTWARE[(selector >> 2) % len(SOFTWARE)]
    out = S.respond(data, ip, port, software=software)
    if isinstance(request, S.DropReason):
        if out != request:
            raise AssertionError("respond answered a datagram that classify_request drops")
    else:
        if not isinstance(out, bytes):
            raise AssertionError(f"respond dropped an accepted request: {out!r}")
        if len(out) > S.max_response_size(len(data), ip):
            raise AssertionError(f"amplification: {len(out)}-byte answer to a {len(data)}-byte request")
        parsed = S.parse_binding_response(out)
        if isinstance(parsed, S.DropReason):
            raise AssertionError(f"our own response does not parse: {parsed}")
        want_ip = ip.split("%", 1)[0].removeprefix("::ffff:")
        if parsed.transaction_id != request.transaction_id or (parsed.ip, parsed.port) != (want_ip, port):
            raise AssertionError(f"response reports {parsed.ip}:{parsed.port}, want {want_ip}:{port}")
    # the client side parses whatever a server (or an attacker) sends without raising
    response = S.parse_binding_response(data)
    if not isinstance(response, S.BindingResponse | S.DropReason):
        raise AssertionError(f"parse_binding_response returned {response!r}")


def seeds() -> list[bytes]:
    txid = bytes(range(12))
    request = S.build_binding_request(txid)
    return [
        request,
        S.build_binding_request(txid, software="tailnode", add_fingerprint=True),
        S.build_binding_request(txid, add_fingerprint=True),
        S.build_binding_response(S.BindingRequest(txid, 20), "203.0.113.7", 41641),
        S.build_binding_response(S.BindingRequest(txid, 200), "2001:db8::1", 3478, software="x"),
        request[:19],
        b"\x00\x01\x00\x00" + b"\x00" * 16,  # RFC 3489 classic: no cookie
    ]


def main(argv: list[str]) -> None:
    from fuzz._harness import run

    run(argv, one_input, seeds)


if __name__ == "__main__":
    main(sys.argv)
