"""A transport-shaped adapter so `DerpServerConn` can speak DERP over a Starlette WebSocket.

DERP-over-WebSocket carries the same byte stream in binary messages. The connection logic writes
synchronously, as to an asyncio transport; this adapter batches those writes into WebSocket messages
from one sender task and reports buffer pressure through pause_writing/resume_writing like a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from .conn import HIGH_WATER, LOW_WATER, DerpServerConn


class WebSocketTransport:
    def __init__(self, websocket: WebSocket, protocol: DerpServerConn) -> None:
        self.websocket = websocket
        self.protocol = protocol
        self.outbox: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.closing = False
        self.wakeup = asyncio.Event()
        self.reading = asyncio.Event()
        self.reading.set()

    # the asyncio.Transport surface DerpServerConn uses
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername" and self.websocket.client:
            return (self.websocket.client.host, self.websocket.client.port)
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        if self.closing:
            return
        self.outbox.append(data)
        self.buffered += len(data)
        self.wakeup.set()
        if not self.paused and self.buffered > HIGH_WATER:
            self.paused = True
            self.protocol.pause_writing()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def close(self) -> None:
        self.closing = True
        self.wakeup.set()

    def abort(self) -> None:
        self.outbox.clear()
        self.close()

    def is_closing(self) -> bool:
        return self.closing

    async def send_loop(self) -> None:
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                if self.outbox:
                    batch, self.outbox = self.outbox, []
                    self.buffered = 0
                    await self.websocket.send_bytes(b"".join(batch))
                    if self.paused and self.buffered < LOW_WATER:
                        self.paused = False
                        self.protocol.resume_writing()
                if self.closing and not self.outbox:
                    with contextlib.suppress(Exception):
                        await self.websocket.close()
                    return
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closing = True

    async def receive_loop(self) -> None:
        try:
            while not self.closing:
                await self.reading.wait()
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is None and message.get("text") is not None:
                    data = message["text"].encode()
                if data:
                    self.protocol.data_received(data)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return


async def serve_websocket(websocket: WebSocket, protocol: DerpServerConn) -> None:
    transport = WebSocketTransport(websocket, protocol)
    protocol.connection_made(transport)
    sender = asyncio.create_task(transport.send_loop())
    try:
        await transport.receive_loop()
    finally:
        transport.close()
        protocol.connection_lost(None)
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(sender, 2.0)
        sender.cancel()
