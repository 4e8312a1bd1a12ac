"""`cluster up --workers N`: any client reaches any other whichever worker the kernel gave it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import pytest

from relay_worker import frames as F
from relay_worker.client import DerpClient, DerpClientError, PeerGone, RecvPacket, Restarting
from tests.support import ClusterProcess, await_until, wait_until

pytestmark = pytest.mark.slow


def directory_sizes(cluster: ClusterProcess) -> list[int]:
    sizes = []
    for doc in cluster.all_varz():
        sizes.append(doc["directory"]["size"])
    return sizes


async def connect_many(url: str, n: int) -> list[DerpClient]:
    return list(await asyncio.gather(*(DerpClient.connect(url) for _ in range(n))))


async def collect(client: DerpClient, into: list[RecvPacket], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            event = await client.recv(timeout=0.5)
        except TimeoutError:
            continue
        except DerpClientError:
            return
        if isinstance(event, RecvPacket):
            into.append(event)


async def test_all_to_all_across_four_workers_arrives_once_at_the_right_key() -> None:
    with ClusterProcess(workers=4) as cluster:
        clients = await connect_many(cluster.url, 100)
        try:
            per_worker = [doc["worker"]["current_connections"] for doc in cluster.all_varz()]
            assert sum(per_worker) == 100 and all(count > 0 for count in per_worker), per_worker
            await await_until(lambda: directory_sizes(cluster) == [100] * 4, timeout=15,
                              what="every worker's directory to hold all 100 keys")
            index_of = {c.public_key: i for i, c in enumerate(clients)}
            received: list[list[RecvPacket]] = [[] for _ in clients]
            stop = asyncio.Event()
            readers = [asyncio.create_task(collect(c, received[i], stop)) for i, c in enumerate(clients)]
            for round_ in range(3):
                for i, sender in enumerate(clients):
                    for j, receiver in enumerate(clients):
                        if i != j:
                            sender.send_nowait(receiver.public_key, f"{i}>{j}#{round_}".encode())
                    await sender.flush()
            expected = 99 * 3
            await await_until(lambda: all(len(r) >= expected for r in received), timeout=60,
                              what="every client to receive 297 packets")
            stop.set()
            await asyncio.gather(*readers)
            for j, packets in enumerate(received):
                seen = Counter(p.data for p in packets)
                assert len(packets) == expected, f"client {j} got {len(packets)}"
                assert all(count == 1 for count in seen.values()), "a packet arrived twice"
                for packet in packets:
                    src_index, rest = packet.data.decode().split(">")
                    dst_index = int(rest.split("#")[0])
                    assert dst_index == j, "a packet reached the wrong key"
                    assert index_of[packet.src] == int(src_index), "wrong source key"
            assert cluster.total("packets_forwarded_out") > 0
        finally:
            await asyncio.gather(*(c.close() for c in clients))


async def test_kill_9_worker_restarts_and_its_keys_leave_with_peer_gone() -> None:
    with ClusterProcess(workers=2) as cluster:
        clients = await connect_many(cluster.url, 16)
        try:
            await await_until(lambda: directory_sizes(cluster) == [16, 16], timeout=15, what="directory sync")
            victim_index = 0
            victim_pid = cluster.worker_pids()[victim_index]
            on_victim: list[DerpClient] = []
            # find which clients sit on the victim: the kill will close exactly those connections
            # every client sends one packet to every other so everyone is a receiver of everyone
            for sender in clients:
                for receiver in clients:
                    if sender is not receiver:
                        sender.send_nowait(receiver.public_key, b"hi")
                await sender.flush()
            for client in clients:
                for _ in range(15):
                    assert isinstance(await client.recv_packet(timeout=10), RecvPacket)
            os.kill(victim_pid, signal.SIGKILL)
            survivors: list[DerpClient] = []
            gone_seen: dict[bytes, set[bytes]] = {}

            async def watch(client: DerpClient) -> None:
                try:
                    while True:
                        event = await client.recv(timeout=15)
                        if isinstance(event, PeerGone):
                            gone_seen.setdefault(client.public_key, set()).add(event.key)
                except DerpClientError:
                    on_victim.append(client)
                except TimeoutError:
                    pass

            watchers = [asyncio.create_task(watch(c)) for c in clients]
            await await_until(lambda: bool(on_victim), timeout=10, what="victim's clients to be cut off")
            new_pids = wait_until(lambda: (p := cluster.worker_pids())[victim_index] not in (0, victim_pid) and p,
                                  timeout=20, what="supervisor to restart the worker")
            assert cluster.supervisor_state()["workers"][victim_index]["restarts"] == 1
            survivors = [c for c in clients if c not in on_victim]
            dead_keys = {c.public_key for c in on_victim}

            def survivors_told() -> bool:
                return all(dead_keys <= gone_seen.get(s.public_key, set()) for s in survivors)

            await await_until(survivors_told, timeout=15, what="PeerGone for every key of the dead worker")
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            # the dead worker's keys are gone from the surviving worker's directory
            assert cluster.varz(1)["directory"]["size"] == len(survivors)
            # survivors never stopped relaying among themselves
            a, b = survivors[0], survivors[1]
            await a.send(b.public_key, b"still up")
            assert (await b.recv_packet(timeout=5)).data == b"still up"
            # the victim's clients reconnect (to whichever worker) and relay again
            for client in on_victim:
                await client.close()
            reconnected = await connect_many(cluster.url, len(on_victim))
            await await_until(lambda: all(s == len(clients) for s in directory_sizes(cluster)), timeout=15,
                              what="directory to converge after the restart")
            await reconnected[0].send(a.public_key, b"back")
            assert (await a.recv_packet(timeout=5)).data == b"back"
            await a.send(reconnected[0].public_key, b"welcome")
            assert (await reconnected[0].recv_packet(timeout=5)).data == b"welcome"
            clients += reconnected
            assert new_pids
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_graceful_stop_sends_restarting_to_every_client_and_exits_zero() -> None:
    cluster = ClusterProcess(workers=2).start()
    try:
        clients = await connect_many(cluster.url, 10)
        assert cluster.total("current_connections") == 10
        cluster.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for client in clients:
            event = await client.recv(timeout=10)
            while not isinstance(event, Restarting):
                event = await client.recv(timeout=10)
            # C11: TryFor at most 5 s ("a server should not send a TryFor duration more than a few seconds")
            assert event.reconnect_in_ms > 0 and 0 < event.try_for_ms <= 5000
            with pytest.raises(DerpClientError):
                await client.recv(timeout=10)  # then the server closes
        assert cluster.wait(timeout=20) == 0, cluster.log()
    finally:
        cluster.__exit__(None, None, None)


async def test_two_clusters_on_one_host_do_not_see_each_other() -> None:
    with ClusterProcess(workers=2) as one, ClusterProcess(workers=2) as two:
        a = await DerpClient.connect(one.url)
        b = await DerpClient.connect(two.url)
        try:
            await a.send(b.public_key, F.DISCO_MAGIC + bytes(70))
            event = await a.recv(timeout=5)
            assert event == PeerGone(b.public_key, F.PEER_GONE_NOT_HERE)
            await await_until(lambda: directory_sizes(one) == [1, 1] and directory_sizes(two) == [1, 1],
                              timeout=10, what="each cluster's directory to hold only its own client")
        finally:
            await a.close()
            await b.close()


def test_second_cluster_on_a_busy_port_fails_with_one_line() -> None:
    with ClusterProcess(workers=1) as one:
        other = ClusterProcess(port=one.port)
        other.start(wait=False)
        assert other.proc is not None
        code = other.proc.wait(30)
        other._reader.join(5)  # type: ignore[union-attr]
        assert code != 0
        assert any("already in use" in line for line in other.output), other.log()
        other.tmp.cleanup()


def test_startup_prints_url_workers_and_derpmap_snippet() -> None:
    with ClusterProcess(workers=2) as cluster:
        # the announcement is several lines; start() returns once the first one is read
        wait_until(lambda: "derpMap node:" in cluster.log(), timeout=10, what="the derpMap line")
        text = cluster.log()
        assert f"http://127.0.0.1:{cluster.port}/derp with 2 workers" in text
        assert '"DERPPort": ' + str(cluster.port) in text


async def test_every_worker_answers_stun_on_the_shared_port() -> None:
    from stun.client import stun_request

    with ClusterProcess(workers=2, stun=True) as cluster:
        results = [await stun_request("127.0.0.1", cluster.stun_port, timeout=2.0) for _ in range(20)]
        assert all(r.ip == "127.0.0.1" and r.port > 0 for r in results)
        served = [doc["stun"]["responses"] for doc in cluster.all_varz()]
        assert sum(served) == 20
        text = await asyncio.to_thread(
            lambda: __import__("urllib.request").request.urlopen(cluster.base + "/metrics", timeout=10).read())
        assert b'stun_requests_total{disposition="response"} 20.0' in text
