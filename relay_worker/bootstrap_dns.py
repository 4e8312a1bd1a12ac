"""derper's /bootstrap-dns (cmd/derper/bootstrap_dns.go): addresses of a few names, for tailscaled's
DNS fallback when its resolver cannot reach anything but a DERP server.

`--bootstrap-dns-names` are resolved every 10 minutes and published as derper publishes them: a
JSON object name -> [addresses], tab-indented, each list shuffled. With no names configured the body
is empty. `--unpublished-bootstrap-dns-names` are answered only to `?q=NAME`.

Difference: derper's `name/txtname` entries poll a TXT record for a rollout percentage; this
project has no DNS client for TXT records, so such entries are never answered (as derper behaves
when the TXT lookup fails). docs/WIRE-NOTES.md lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket

log = logging.getLogger("relay_worker.bootstrap_dns")

REFRESH_INTERVAL = 600.0
REFRESH_TIMEOUT = 60.0
#: derper clears its queried-names map past this ("defensive"); we only count distinct names
MAX_QUERIED = 500


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _to_json(ips: dict[str, list[str]] | None) -> bytes:
    return json.dumps(ips, indent="\t", sort_keys=True).encode()


class BootstrapDNS:
    def __init__(self, names: str = "", unpublished: str = "") -> None:
        self.names = _names(names)
        self.unpublished = _names(unpublished)
        self.published_json = b""  # empty until the first refresh, and forever without names
        self.unpublished_ips: dict[str, list[str]] = {}
        self.requests = 0
        self.queried: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def configured(self) -> bool:
        return bool(self.names or self.unpublished)

    def start(self) -> None:
        if self.configured and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH_TIMEOUT):
                    await self.refresh()
            await asyncio.sleep(REFRESH_INTERVAL)

    async def refresh(self) -> None:
        if self.names:
            resolved = await resolve_all(self.names)
            for ips in resolved.values():
                random.shuffle(ips)
            self.published_json = _to_json(resolved or None)
        if self.unpublished:
            # "name/txtname" needs a TXT lookup for its percentage: not supported, never answered
            self.unpublished_ips = await resolve_all([n for n in self.unpublished if "/" not in n])

    def answer(self, q: str, remote: str) -> bytes:
        self.requests += 1
        if q:
            if len(self.queried) < MAX_QUERIED:
                self.queried.add(q)
            ips = self.unpublished_ips.get(q)
            if ips:
                return _to_json({q: ips})
        return self.published_json


async def resolve_all(names: list[str]) -> dict[str, list[str]]:
    loop = asyncio.get_running_loop()
    out: dict[str, list[str]] = {}
    for name in names:
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            log.info("bootstrap DNS lookup %r: %s", name, exc)
            continue
        ips: list[str] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            ip = str(sockaddr[0])
            if ip not in ips:
                ips.append(ip)
        out[name] = ips
    return out
