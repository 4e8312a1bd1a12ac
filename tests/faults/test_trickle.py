"""A client that sends its handshake and frames one byte per write must cost O(bytes), not O(bytes²).

The frame parser used to join each read to everything buffered and copy the rest back: a frame
trickled in byte by byte cost a copy of the whole partial frame per byte (issue 15: about 22 us of
CPU per byte). The work is counted, not timed: the bytes each read allocates (tracemalloc: what
was allocated during the read beyond what it kept) are what the parser copies. They must not grow
with the frame's size: per byte, a 64 KiB trickle must cost what a 16 KiB one does.

The stack is the worker's own, in process: uvicorn's configuration, `DerpHttpProtocol` for the
HTTP head (httptools), then `DerpServerConn` and its `ServerSession` for the DERP frames; only
the socket is a stand-in that records what the server writes.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

from nacl.public import Box
from nacl.public import PublicKey as NaclPublicKey
from uvicorn.server import ServerState

from relay_worker import frames as F
from relay_worker.http_app import build_app
from relay_worker.keys import PrivateKey
from relay_worker.relay import Relay
from relay_worker.server import uvicorn_config
from tests.faults.conftest import report

HEAD = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n"
SMALL, LARGE = 16 << 10, 64 << 10


class Socket:
    """The accepted socket's transport: records writes, follows set_protocol like asyncio's."""

    def __init__(self) -> None:
        self.protocol: Any = None
        self.out = bytearray()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 443)}.get(name, default)

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def write(self, data: bytes) -> None:
        self.out += data

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def trickle_cost(size: int) -> tuple[float, list[int]]:
    """Handshake and one SendPacket, each about `size` bytes, one byte per read; returns the bytes
    allocated per byte read and the frame types the server wrote."""
    relay = Relay(PrivateKey.generate())
    config = uvicorn_config(build_app(relay), relay)
    if not config.loaded:
        config.load()
    sock = Socket()
    http_protocol: Any = config.http_protocol_class  # DerpHttpProtocol, bound to this relay
    sock.protocol = http_protocol(config=config, server_state=ServerState(), app_state={})
    sock.protocol.connection_made(sock)
    key = PrivateKey.generate()
    public = key.public().raw
    nonce = bytes(F.NONCE_LEN)
    # a ClientInfo padded with a field derper ignores (Go's JSON skips unknown names)
    info = b'{"version":2,"pad":"' + b"x" * size + b'"}'
    sealed = Box(key.nacl(), NaclPublicKey(relay.server_public)).encrypt(info, nonce).ciphertext
    packet = b"p" * min(size, F.MAX_PACKET_SIZE)
    stream = HEAD + F.build_client_info(public, nonce, sealed) + F.build_send_packet(public, packet)
    transient = 0
    tracemalloc.start()
    try:
        for index in range(len(stream)):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            sock.protocol.data_received(stream[index : index + 1])
            transient += tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    written = [t for t, _ in F.FrameParser(F.MAX_INFO_LEN).feed(bytes(sock.out))]
    return transient / len(stream), written


async def test_a_byte_by_byte_handshake_costs_the_same_per_byte_whatever_the_frame_size() -> None:
    # the protocols read the running loop; their timers are never due during the test
    await asyncio.sleep(0)
    small, small_frames = trickle_cost(SMALL)
    large, large_frames = trickle_cost(LARGE)
    for frames in (small_frames, large_frames):
        assert frames == [F.SERVER_KEY, F.SERVER_INFO, F.RECV_PACKET], "the trickled handshake did not complete"
    report("byte_by_byte_handshake", bytes_allocated_per_byte={"16KiB": round(small), "64KiB": round(large)})
    # recopying the buffer costs the partial frame's size per byte: half the frame on average,
    # so 8 KiB/byte at 16 KiB and 32 KiB/byte at 64 KiB. Appending costs a few hundred bytes.
    assert large < 2 * small, f"{large:.0f} bytes allocated per byte at 64 KiB, {small:.0f} at 16 KiB"
    assert large < 2048, f"{large:.0f} bytes allocated per byte read"
