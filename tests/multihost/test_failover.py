"""kill -9 of a whole node in its own namespace (region 903): its keys leave the other regions'
directories within the documented bound, clients that heard from its keys get PeerGone, and its
client, reconnecting to another region's node with the same key, is reachable again."""

from __future__ import annotations

import pytest

from tests.multihost.netns import Topology
from tests.multihost.scenarios import all_keys, close_clients, connect_clients, failover_kill_c

pytestmark = pytest.mark.timeout(180)


async def test_kill_9_of_a_region_fails_over(fresh_regions: Topology) -> None:
    topo = fresh_regions
    clients = await connect_clients(topo, 2)
    returned = None
    try:
        await all_keys(topo, 6)
        result, returned = await failover_kill_c(topo, clients)
        print(f"\nfailover: {result}")
        # documented bound for a dead member: dead_after + 2 heartbeats; allowed: dead_after + 5 s
        bound = topo.dead_after + 5
        assert set(result.keys_gone) == {"a", "b"} and all(t < bound for t in result.keys_gone.values())
        assert set(result.members_dead) == {"a", "b"} and all(t < bound for t in result.members_dead.values())
        assert result.peer_gone_missing == 0 and all(t < bound for t in result.peer_gone), result.peer_gone
        # back on b, with its key: every worker of a and b resolves it, and a's client reaches it
        assert set(result.reconnect_known) == {"a", "b"}
        assert result.reachable < 10, result.reachable
    finally:
        await close_clients(clients)
        if returned is not None:
            await returned.close()
