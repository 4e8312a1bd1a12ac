"""Tailscale's own DERP mesh, client side: what derper's `-mesh-with` does, so one of our nodes can
sit in a region beside stock derpers.

For each configured derper URL the node keeps one DERP connection (one worker holds them all:
mesh.derper_keys), authenticated with the region's mesh key; it subscribes with WatchConns and
tracks which keys that derper holds (PeerPresent / PeerGone). Packets for those keys leave with
ForwardPacket on that connection. The connection is re-established with backoff; while it is
down, the derper's keys are considered gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from relay_worker import frames as F
from relay_worker.client import DerpClient, DerpClientError, PeerGone
from relay_worker.frames import Payload
from relay_worker.keys import PrivateKey

log = logging.getLogger("mesh.derp_peering")

#: bytes we let queue on a derper connection before dropping forwarded packets (slow peer)
MAX_BUFFERED = 4 << 20
#: derper's mesh client retries every 5 s (derphttp RunWatchConnectionLoop's retryInterval); we
#: start at RETRY_FIRST and double up to that, so a broken peering heals as fast as derper's does
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
#: derper's client reads with a 120 s deadline (derp_client.go Recv); the derper sends a KeepAlive
#: every 60-65 s, so silence that long means a dead or half-open path: reconnect
READ_TIMEOUT = 120.0


class DerpMeshPeer:
    def __init__(self, url: str, mesh_key: str, private_key: PrivateKey, *,
                 on_present: Callable[[bytes, DerpMeshPeer], None],
                 on_gone: Callable[[bytes, DerpMeshPeer], None],
                 on_watching: Callable[[DerpMeshPeer], None] | None = None, read_timeout: float = READ_TIMEOUT) -> None:
        self.url = url
        self.read_timeout = read_timeout
        self.mesh_key = mesh_key
        self.private_key = private_key
        self.on_present = on_present
        self.on_gone = on_gone
        #: called each time the connection is up and WatchConns is sent (the worker's join gate waits for it)
        self.on_watching = on_watching
        self.keys: set[bytes] = set()
        self.client: DerpClient | None = None
        self.task: asyncio.Task[None] | None = None
        self.connected = False
        self.forwarded = 0
        self.dropped = 0
        self.connects = 0
        self.ever_watched = False  # connected and watching at least once
        self.last_error = ""
        #: ForwardPacket frames of this loop iteration, written together
        self._pending: list[bytes] = []

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        if not self.running:
            self.task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """Give the connection up (another worker of the node holds it now); its keys go at once."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.client = None  # the cancelled task closes it
        self.connected = False
        self._forget_all()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.client is not None:
            await self.client.close()

    def forward(self, *, src: bytes, dst: bytes, packet: Payload) -> bool:
        client = self.client
        if client is None or not self.connected:
            return False
        writer = getattr(client.io, "writer", None)
        if writer is not None and writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.dropped += 1
            return True  # the owner is known; the packet is dropped and counted, not bounced
        # One write per loop iteration, not per packet: the holder forwards for the whole node,
        # and a write (a TLS record, a syscall) per packet made it fall behind in bursts that
        # overflowed derper's 32-packet queue per client
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(F.build_forward_packet(src, dst, packet))
        self.forwarded += 1
        return True

    def _flush(self) -> None:
        frames, self._pending = self._pending, []
        client = self.client
        if client is None or not self.connected:
            self.forwarded -= len(frames)
            self.dropped += len(frames)  # the connection ended within this loop iteration
            return
        client.io.write(b"".join(frames))

    async def _run(self) -> None:
        backoff = RETRY_FIRST
        while True:
            client: DerpClient | None = None
            try:
                dial_url, tls_name = _dial_target(self.url)
                # derper's own mesh client never calls SetCanAckPings: CanAckPings false
                client = await DerpClient.connect(dial_url, self.private_key, mesh_key=self.mesh_key,
                                                  server_hostname=tls_name, can_ack_pings=False, timeout=10)
                self.client = client
                self.connects += 1
                await client.watch_conns()
                self.connected = True
                backoff = RETRY_FIRST
                log.info("meshed with derper %s", self.url)
                self.ever_watched = True
                if self.on_watching is not None:
                    self.on_watching(self)
                await self._receive(client)
            except (DerpClientError, OSError, TimeoutError, F.ProtocolError) as exc:
                self.last_error = str(exc)
                log.warning("mesh with %s: %s; retrying in %.1fs", self.url, exc, backoff)
            except Exception as exc:  # whatever a peer sends must not end the peering for good
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("mesh with %s failed unexpectedly; retrying in %.1fs", self.url, backoff)
            finally:
                # after stop() a new task may already own self.client: clean up only our own
                if client is not None and self.client is client:
                    self.client = None
                    self.connected = False
                    self._forget_all()
                if client is not None:
                    await client.close()
            await asyncio.sleep(backoff)
            # before the first connection the derper is most likely starting beside us: keep trying
            # at the first interval, so the worker's join (and its held handshakes) waits no longer
            if self.ever_watched:
                backoff = min(backoff * 2, RETRY_MAX)

    async def _receive(self, client: DerpClient) -> None:
        while True:
            try:
                event = await client.recv(timeout=self.read_timeout)
            except TimeoutError:
                raise DerpClientError(f"nothing received for {self.read_timeout:.0f}s (read deadline)") from None
            if isinstance(event, F.PeerPresent):
                if event.key not in self.keys:
                    self.keys.add(event.key)
                    self.on_present(event.key, self)
            elif isinstance(event, PeerGone) and event.key in self.keys:
                self.keys.discard(event.key)
                self.on_gone(event.key, self)

    def _forget_all(self) -> None:
        # derper's RunWatchConnectionLoop clears every forwarder of that peer when its connection ends
        keys, self.keys = self.keys, set()
        for key in keys:
            self.on_gone(key, self)

    def stats(self) -> dict[str, object]:
        return {"url": self.url, "connected": self.connected, "keys": len(self.keys), "forwarded": self.forwarded,
                "dropped": self.dropped, "connects": self.connects, "last_error": self.last_error}


def _dial_target(url: str) -> tuple[str, str | None]:
    """derper's -mesh-with HOST/DIALHOST arrives as https://HOST/derp#dial=DIALHOST (cluster/config.py):
    dial DIALHOST, check TLS against HOST. Returns (url to dial, TLS server name or None)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.fragment.startswith("dial="):
        return url, None
    dial = parts.fragment[len("dial="):]
    netloc = f"[{dial}]" if ":" in dial else dial
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), parts.hostname
