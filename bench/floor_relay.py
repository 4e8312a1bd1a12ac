#!/usr/bin/env python3
"""The floor: the smallest asyncio DERP relay we can write, as a yardstick for the real one.

It does only what a relay of two DERP clients cannot skip: the HTTP upgrade, the NaCl handshake
(ServerKey, ClientInfo, ServerInfo) and SendPacket -> RecvPacket, with uvloop and a raw Protocol.
No metrics, queues, keepalives, admission, PeerGone or duplicate handling, and no backpressure: it
is a baseline for `cluster bench relay --compare-floor`, not a server anyone should run. Figures
for the real relay are given as ratios to this one, measured on the same machine in the same run,
so they say how far the relay is from what Python itself allows rather than from a guessed number.

Writes: by default the frames one read produces for one destination leave in ONE writelines call
(one send syscall), because on loopback the syscall, not Python, is most of a packet's cost; that
is the floor. `--per-frame-writes` instead writes every RecvPacket as it is parsed (one syscall per
packet), the floor of relays that do not coalesce, so the two can be told apart.

    python bench/floor_relay.py --listen 127.0.0.1:3341 [--per-frame-writes]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct

import nacl.utils
from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"DERP\xf0\x9f\x94\x91"
HEADER = struct.Struct(">BI")
SERVER_KEY, CLIENT_INFO, SERVER_INFO, SEND_PACKET, RECV_PACKET = 1, 2, 3, 4, 5
MAX_FRAME = 256 << 10  # ClientInfo's limit; after the handshake nothing legitimate is larger
HTTP, HANDSHAKE, ACTIVE = range(3)


class Floor:
    def __init__(self, per_frame_writes: bool = False) -> None:
        self.per_frame_writes = per_frame_writes
        self.private = PrivateKey.generate()
        self.public = bytes(self.private.public_key)
        self.clients: dict[bytes, FloorConn] = {}
        self.server_key_frame = HEADER.pack(SERVER_KEY, len(MAGIC) + 32) + MAGIC + self.public
        self.upgrade_response = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
            b"Derp-Version: 2\r\nDerp-Public-Key: " + self.public.hex().encode() + b"\r\n\r\n"
        )


class FloorConn(asyncio.Protocol):
    __slots__ = ("buf", "floor", "key", "state", "transport")

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.buf = bytearray()
        self.state = HTTP
        self.key = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.floor.clients.get(self.key) is self:
            del self.floor.clients[self.key]
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.state != ACTIVE:
            self.buf += data
            self._handshake()
            return
        # The relay loop: every complete frame of this read, parsed in place.
        buf = self.buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        clients = self.floor.clients
        key = self.key
        unpack = HEADER.unpack_from
        pack = HEADER.pack
        per_frame = self.floor.per_frame_writes
        # destination -> the RecvPacket frames of this read for it (a dict keeps first-seen order)
        out: dict[FloorConn, list[bytes]] = {}
        pos = 0
        end = len(view)
        while end - pos >= 5:
            frame_type, length = unpack(view, pos)
            if length > MAX_FRAME:
                self.transport.abort()  # type: ignore[union-attr]
                return
            stop = pos + 5 + length
            if stop > end:
                break
            if frame_type == SEND_PACKET and length >= 32:
                target = clients.get(bytes(view[pos + 5 : pos + 37]))
                if target is not None and target.transport is not None:
                    frame = pack(RECV_PACKET, length) + key + view[pos + 37 : stop]
                    if per_frame:
                        target.transport.write(frame)
                    else:
                        pending = out.get(target)
                        if pending is None:
                            out[target] = [frame]
                        else:
                            pending.append(frame)
            pos = stop
        for target, frames in out.items():
            if target.transport is not None:
                target.transport.writelines(frames)
        if buf:
            del buf[:pos]
        elif pos < end:
            buf += memoryview(data)[pos:]

    def _handshake(self) -> None:
        buf = self.buf
        transport = self.transport
        assert transport is not None
        if self.state == HTTP:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 16384:
                    transport.abort()
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            if b"upgrade: derp" not in head:
                transport.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                transport.close()
                return
            if b"derp-fast-start: 1" not in head:
                transport.write(self.floor.upgrade_response)
            transport.write(self.floor.server_key_frame)
            self.state = HANDSHAKE
        if len(buf) < 5:
            return
        frame_type, length = HEADER.unpack_from(buf, 0)
        if frame_type != CLIENT_INFO or length > MAX_FRAME or length < 32 + 24:
            transport.abort()
            return
        if len(buf) < 5 + length:
            return
        client_public = bytes(buf[5:37])
        nonce = bytes(buf[37:61])
        sealed = bytes(buf[61 : 5 + length])
        del buf[: 5 + length]
        box = Box(self.floor.private, PublicKey(client_public))
        try:
            box.decrypt(sealed, nonce)  # the JSON inside does not matter to the floor
        except Exception:
            transport.abort()
            return
        reply_nonce = nacl.utils.random(24)
        sealed_info = box.encrypt(b'{"version":2}', reply_nonce).ciphertext
        transport.write(HEADER.pack(SERVER_INFO, 24 + len(sealed_info)) + reply_nonce + sealed_info)
        self.key = client_public
        self.floor.clients[client_public] = self
        self.state = ACTIVE
        if buf:
            rest = bytes(buf)
            buf.clear()
            self.data_received(rest)


async def serve(host: str, port: int, per_frame_writes: bool) -> None:
    floor = Floor(per_frame_writes)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FloorConn(floor), host, port, backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    bound = server.sockets[0].getsockname()
    mode = "per-frame writes" if per_frame_writes else "coalesced writes"
    print(f"floor relay pid {os.getpid()} listening on http://{bound[0]}:{bound[1]}/derp ({mode})", flush=True)
    await stop
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:3341", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    parser.add_argument("--per-frame-writes", action="store_true",
                        help="one transport write per relayed packet instead of one per destination per read")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    coro = serve(host.strip("[]") or "127.0.0.1", int(port), args.per_frame_writes)
    if args.no_uvloop:
        asyncio.run(coro)
    else:
        import uvloop

        uvloop.run(coro)


if __name__ == "__main__":
    main()
