"""A regression guard for the relay hot path that counts work instead of timing it.

Timing tests are flaky on a shared 2-core box, so these drive a real Relay + DerpServerConn
(and the ServerSession inside it) in-process over fake transports and count what relaying N
packets costs: transport writes, asyncio tasks, futures and locks (none allowed), loop callbacks
(at most one per read), and Python-level function calls per packet. A change that quietly adds a
coroutine, a lock, a timer or a per-packet helper chain to the hot path fails here with the count
that grew, long before a benchmark would notice.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest

from relay_worker import frames as F
from relay_worker.conn import DerpServerConn
from relay_worker.handshake import ClientInfo, seal_client_info
from relay_worker.keys import PrivateKey
from relay_worker.relay import Relay

N = 400
PACKET = bytes(range(256)) * 4 + b"x" * 176  # 1200 bytes, the benchmark's size

#: Python functions per relayed packet when every packet arrives in its own read: today
#: DerpServerConn.data_received -> ServerSession.receive_data -> FrameParser.feed ->
#: _handle_frames -> deliver_frames is 5 (with the compiled loop: ... -> feed -> _deliver_routed ->
#: deliver_frames). Headroom for one more small helper, not for a coroutine
#: (which costs several calls) or a chain of them.
MAX_CALLS_PER_PACKET_ONE_PER_READ = 6.0
#: ... and when a read carries many packets (the common case under load): under 0.1 call per
#: packet today (the per-read calls amortise away, and the loop over frames calls nothing).
MAX_CALLS_PER_PACKET_BULK = 2.0

#: callables whose use on the hot path is a regression whatever the count: tasks, futures, locks
FORBIDDEN = {
    "create_task", "ensure_future", "run_in_executor", "run_coroutine_threadsafe", "acquire", "release",
    "create_future", "sleep",
}
FORBIDDEN_MODULES = ("asyncio/locks.py", "asyncio/queues.py", "asyncio/tasks.py", "threading.py")
#: loop callbacks: one per read (say, a deferred flush of coalesced writes) is per-read work and
#: allowed; one per packet is not
SCHEDULING = {"call_soon", "call_soon_threadsafe", "call_later", "call_at"}


class FakeTransport:
    """Just enough of an asyncio transport for DerpServerConn; counts every write call."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.writes = 0
        self.data = bytearray()
        self.closing = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.data += data

    def writelines(self, chunks: Any) -> None:
        self.writes += 1
        for chunk in chunks:
            self.data += chunk

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


def frames_of(data: bytes | bytearray) -> list[tuple[int, bytes]]:
    parser = F.FrameParser(F.MAX_INFO_LEN)
    return parser.feed(bytes(data))


def connect(relay: Relay, port: int) -> tuple[DerpServerConn, FakeTransport, bytes]:
    """A handshaken, registered connection: ServerKey out, ClientInfo in, ServerInfo out."""
    key = PrivateKey.generate()
    transport = FakeTransport(("127.0.0.1", port))
    conn = DerpServerConn(relay, ("127.0.0.1", port))
    conn.connection_made(transport)
    conn.data_received(seal_client_info(key, relay.server_public, ClientInfo()))
    sent = [frame_type for frame_type, _ in frames_of(transport.data)]
    assert sent[:2] == [F.SERVER_KEY, F.SERVER_INFO], f"handshake did not complete: {sent}"
    public = key.public().raw
    assert relay.clients.get(public) is conn.session
    transport.data.clear()
    transport.writes = 0
    return conn, transport, public


@contextmanager
def counting(skip: tuple[str, ...] = (__file__,)) -> Iterator[Counter[str]]:
    """Count Python calls (by file:function) and C calls (by name) while the block runs.

    Calls made from this test module's own fakes are not the hot path's cost and are skipped.
    """
    calls: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            if code.co_filename not in skip:
                calls[f"{code.co_filename}:{code.co_name}"] += 1
        elif event == "c_call" and frame.f_code.co_filename not in skip:
            calls["C:" + getattr(arg, "__name__", repr(arg))] += 1

    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(None)


@contextmanager
def counting_tasks(loop: asyncio.AbstractEventLoop) -> Iterator[list[Any]]:
    created: list[Any] = []
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        yield created
    finally:
        loop.set_task_factory(previous)


def python_calls(calls: Counter[str]) -> int:
    return sum(n for name, n in calls.items() if not name.startswith("C:"))


def forbidden_in(calls: Counter[str]) -> dict[str, int]:
    return {name: n for name, n in calls.items()
            if name.rsplit(":", 1)[-1] in FORBIDDEN or any(m in name for m in FORBIDDEN_MODULES)}


def scheduled(calls: Counter[str]) -> int:
    # Python-level loop methods show up once as "call" and C ones as "c_call"; take the larger view
    # per method so that neither loop implementation is counted twice.
    per_method: dict[str, int] = {}
    for name, n in calls.items():
        method = name.rsplit(":", 1)[-1]
        if method in SCHEDULING:
            per_method[method] = max(per_method.get(method, 0), n)
    return sum(per_method.values())


def send_frames(dst: bytes, count: int) -> list[bytes]:
    return [F.build_send_packet(dst, PACKET) for _ in range(count)]


def check_delivered(transport: FakeTransport, src: bytes, count: int) -> None:
    received = frames_of(transport.data)
    assert len(received) == count, f"{len(received)} frames delivered for {count} packets"
    for frame_type, payload in received:
        assert frame_type == F.RECV_PACKET
        assert payload[:32] == src and payload[32:] == PACKET


def relay_under_guard(feed: Callable[[], None]) -> tuple[Counter[str], list[Any], int]:
    loop = asyncio.get_running_loop()
    tasks_before = len(asyncio.all_tasks(loop))
    with counting_tasks(loop) as created, counting() as calls:
        feed()
    return calls, created, len(asyncio.all_tasks(loop)) - tasks_before


async def settle() -> None:
    """Let callbacks a flush may have been deferred to run before frames are checked."""
    for _ in range(3):
        await asyncio.sleep(0)


def report(calls: Counter[str]) -> str:
    return ", ".join(f"{name.rsplit('/', 1)[-1]}={n}" for name, n in calls.most_common(12))


@pytest.fixture
def relay(hot_path: str) -> Relay:
    relay = Relay(PrivateKey.generate())
    assert (relay.router is not None) == (hot_path == "compiled")
    return relay


async def test_one_packet_per_read_costs_one_write_and_no_task(relay: Relay) -> None:
    a, ta, a_key = connect(relay, 1001)
    _, tb, b_key = connect(relay, 1002)
    reads = send_frames(b_key, N)

    def feed() -> None:
        for data in reads:
            a.data_received(data)

    calls, created, new_tasks = relay_under_guard(feed)
    await settle()
    check_delivered(tb, a_key, N)
    assert tb.writes <= N, f"{tb.writes} transport writes for {N} packets"
    assert ta.writes == 0, "the sender got frames back for plain packets"
    assert not created and new_tasks == 0, f"tasks created on the hot path: {created}"
    assert not forbidden_in(calls), f"tasks, futures or locks on the hot path: {forbidden_in(calls)}"
    assert scheduled(calls) <= len(reads), f"{scheduled(calls)} loop callbacks for {len(reads)} reads"
    per_packet = python_calls(calls) / N
    assert per_packet <= MAX_CALLS_PER_PACKET_ONE_PER_READ, (
        f"{per_packet:.2f} Python calls per packet (limit {MAX_CALLS_PER_PACKET_ONE_PER_READ}): {report(calls)}")


async def test_bulk_read_costs_at_most_one_write_per_packet(relay: Relay) -> None:
    a, _, a_key = connect(relay, 1001)
    _, tb, b_key = connect(relay, 1002)
    blob = b"".join(send_frames(b_key, N))
    # Reads that split frames at awkward places, as TCP does: the parser must keep the remainder.
    cuts = [0, 7, 1300, 1301, len(blob) // 2, len(blob) - 3, len(blob)]

    def feed() -> None:
        for start, stop in itertools.pairwise(cuts):
            a.data_received(blob[start:stop])

    calls, created, new_tasks = relay_under_guard(feed)
    await settle()
    check_delivered(tb, a_key, N)
    assert tb.writes <= N, f"{tb.writes} transport writes for {N} packets"
    assert not created and new_tasks == 0, f"tasks created on the hot path: {created}"
    assert not forbidden_in(calls), f"tasks, futures or locks on the hot path: {forbidden_in(calls)}"
    reads = len(cuts) - 1
    assert scheduled(calls) <= reads, f"{scheduled(calls)} loop callbacks for {reads} reads of {N} packets"
    per_packet = python_calls(calls) / N
    assert per_packet <= MAX_CALLS_PER_PACKET_BULK, (
        f"{per_packet:.2f} Python calls per packet (limit {MAX_CALLS_PER_PACKET_BULK}): {report(calls)}")


async def test_many_senders_to_one_receiver(relay: Relay) -> None:
    """Fan-in: every sender's packets arrive, with at most one write each."""
    _, tb, b_key = connect(relay, 2000)
    senders = [connect(relay, 2001 + i) for i in range(8)]
    per_sender = N // 8

    def feed() -> None:
        for _ in range(per_sender):
            for conn, _, _ in senders:
                conn.data_received(F.build_send_packet(b_key, PACKET))

    calls, created, new_tasks = relay_under_guard(feed)
    await settle()
    received = frames_of(tb.data)
    assert len(received) == per_sender * 8
    assert Counter(payload[:32] for _, payload in received) == Counter(
        {key: per_sender for _, _, key in senders})
    assert tb.writes <= per_sender * 8
    assert not created and new_tasks == 0
    assert not forbidden_in(calls), f"tasks, futures or locks on the hot path: {forbidden_in(calls)}"
    assert scheduled(calls) <= per_sender * 8


class CountingForwarder:
    """The mesh side of the Forwarder interface: owns the keys in `remote`, counts forwards.

    Only `forward` matters here; every other hook (the interface's notifications, which the mesh
    work is still reshaping) is accepted and ignored, so this guard does not pin their names.
    """

    def __init__(self) -> None:
        self.forwarded = 0
        self.remote: set[bytes] = set()

    def forward(self, *, dst: bytes, src: bytes, packet: F.Payload) -> bool:
        if dst not in self.remote:
            return False
        self.forwarded += 1
        return True

    def remote_winner(self, key: bytes) -> bool:
        return False

    is_remote_winner = remote_winner

    def remote_keys(self) -> list[bytes]:
        return list(self.remote)

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


async def test_packets_for_another_worker_go_to_the_forwarder_without_tasks(relay: Relay) -> None:
    forwarder = CountingForwarder()
    relay.forwarder = forwarder
    a, ta, _ = connect(relay, 3001)
    remote = PrivateKey.generate().public().raw
    forwarder.remote.add(remote)
    blob = b"".join(send_frames(remote, N))

    calls, created, new_tasks = relay_under_guard(lambda: a.data_received(blob))
    await settle()
    assert forwarder.forwarded == N
    assert ta.writes == 0
    assert not created and new_tasks == 0, f"tasks created on the forwarding path: {created}"
    assert not forbidden_in(calls), f"tasks, futures or locks on the forwarding path: {forbidden_in(calls)}"
    assert scheduled(calls) <= 1, f"{scheduled(calls)} loop callbacks for one read of {N} packets"
    per_packet = python_calls(calls) / N
    assert per_packet <= MAX_CALLS_PER_PACKET_BULK, (
        f"{per_packet:.2f} Python calls per forwarded packet (limit {MAX_CALLS_PER_PACKET_BULK}): {report(calls)}")
