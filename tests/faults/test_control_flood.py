"""A flood of cheap control frames from one admitted client must not freeze the worker for others.

Each NotePreferred used to be applied (and published to the directory) on its own, and each Ping
answered with its own write, so one read of a flood cost thousands of state changes or syscalls.
Now a read's NotePreferred frames cost one state change, and at most PONGS_PER_READ Pings per read
are answered (derper likewise ignores Pings while a Pong is still waiting to go out).

Assertions are counts, not times: how many Pings were answered, what the final preferred state
is, and that a well-behaved pair keeps relaying during the flood (each round trip within a
generous deadline).
"""

from __future__ import annotations

import asyncio

from relay_worker import frames as F
from relay_worker.client import DerpClient
from tests.support import ClusterProcess, await_until

FLOOD = 20_000


async def test_note_preferred_and_ping_flood_costs_bounded_work_per_read() -> None:
    with ClusterProcess(workers=2) as node:
        await await_until(lambda: all(doc["mesh"]["peers_alive"] == 1 for doc in node.all_varz()),
                          timeout=30, what="the two workers to meet")
        flooder = await DerpClient.connect(node.url)
        a, b = await DerpClient.connect(node.url), await DerpClient.connect(node.url)
        try:
            burst = b"".join(F.build_note_preferred(i % 2 == 0) + F.build_ping(i.to_bytes(8, "big"))
                             for i in range(FLOOD - 1))
            burst += F.build_note_preferred(True) + F.build_ping(bytes(8))

            async def pair() -> int:
                done = 0
                for i in range(50):
                    await a.send(b.public_key, b"rt %d" % i)
                    assert (await b.recv_packet(timeout=10)).data == b"rt %d" % i
                    done += 1
                return done

            relaying = asyncio.create_task(pair())
            for start in range(0, len(burst), 1 << 16):
                await flooder.send_raw(burst[start : start + (1 << 16)])
            assert await relaying == 50
            await await_until(lambda: node.total("got_ping") == FLOOD, timeout=30,
                              what="the worker to read the whole flood")
            answered = node.total("sent_pong")
            # one read carries thousands of Pings; a handful per read are answered
            assert 0 < answered <= FLOOD // 10, f"{answered} of {FLOOD} Pings answered"
            # the last NotePreferred of the flood is the one that holds
            await await_until(lambda: node.total("current_home_connections") == 1, timeout=10,
                              what="the flooder's final NotePreferred(true) to hold")
        finally:
            for c in (flooder, a, b):
                await c.close()
