"""The compiled relay loop (relay_worker/_fastpath.c) against the pure-Python reference.

Two relays with the same keys are fed the same byte stream, cut into reads at random places, with
the receiver pausing and resuming in between; every byte each client is sent, every counter, the
sender's state and the read-limit charge must be the same on both loops.
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import wire
from relay_worker import fastpath
from relay_worker import frames as F
from relay_worker.handshake import ClientInfo, seal_client_info
from relay_worker.keys import PrivateKey
from relay_worker.relay import Relay
from relay_worker.session import ACTIVE, ServerSession
from tests.unit.test_session import T0, Clock, Wire

pytestmark = pytest.mark.skipif(not fastpath.available() and os.environ.get("CI") != "true",
                                reason="relay_worker._fastpath not built")

SERVER = PrivateKey.generate()
SENDER, RECEIVER, OTHER = (PrivateKey.generate() for _ in range(3))
UNKNOWN = PrivateKey.generate().public().raw
DISCO = F.DISCO_MAGIC + bytes(F.KEY_LEN + F.NONCE_LEN)


def packet_to(dst: bytes) -> st.SearchStrategy[bytes]:
    body = st.one_of(st.binary(max_size=64), st.builds(lambda n: b"p" * n, st.integers(0, 1400)),
                     st.binary(max_size=16).map(lambda tail: DISCO + tail))
    return body.map(lambda packet: F.build_send_packet(dst, packet))


GOOD_FRAMES = st.one_of(
    packet_to(RECEIVER.public().raw), packet_to(OTHER.public().raw), packet_to(SENDER.public().raw),
    packet_to(UNKNOWN), st.binary(min_size=8, max_size=8).map(F.build_ping), st.booleans().map(F.build_note_preferred),
    st.binary(max_size=40).map(lambda data: F.build_frame(0x30, data)),
    st.binary(min_size=8, max_size=8).map(F.build_pong),
)
BAD_FRAMES = st.sampled_from([
    F.build_frame(F.SEND_PACKET, bytes(31)),  # shorter than a key
    F.build_frame(F.NOTE_PREFERRED, b"\x01\x01"),
    F.build_forward_packet(UNKNOWN, UNKNOWN, b"x"),  # needs the mesh key
    F.frame_header(F.SEND_PACKET, F.MAX_FRAME_LEN + 1),  # the parser refuses the length
])
#: what a hostile client can put where the compiled loop looks: a SendPacket header with any length
#: (short, oversized, longer than what follows) and any bytes after it
HOSTILE_SEND = st.builds(lambda length, body: F.frame_header(F.SEND_PACKET, length) + body,
                         st.one_of(st.integers(0, 80), st.integers(0, (1 << 32) - 1)), st.binary(max_size=120))
STREAM = st.lists(st.one_of(GOOD_FRAMES, GOOD_FRAMES, GOOD_FRAMES, BAD_FRAMES, HOSTILE_SEND), min_size=1, max_size=40)


class Side:
    """One relay, the sender and two receivers on it, all handshaken."""

    def __init__(self, *, compiled: bool, rate: int) -> None:
        self.relay = Relay(SERVER)
        if not compiled:
            self.relay.router = None
        self.relay.token_bucket_rate = rate
        self.sessions: dict[str, tuple[ServerSession, Wire]] = {}
        for name, key in (("sender", SENDER), ("receiver", RECEIVER), ("other", OTHER)):
            session = ServerSession(self.relay, ("127.0.0.1", len(self.sessions) + 1), clock=Clock())
            wire = Wire()
            session.start(wire, T0)
            session.receive_data(seal_client_info(key, self.relay.server_public, ClientInfo()), T0)
            assert session.state == ACTIVE
            wire.writes.clear()
            self.sessions[name] = (session, wire)

    def observed(self) -> dict[str, object]:
        sender = self.sessions["sender"][0]
        stats = self.relay.stats.snapshot()
        for clock_reading in ("started", "uptime"):
            del stats[clock_reading]
        return {
            "stats": stats,
            "sender_state": sender.state,
            "written": {name: (b"".join(wire.writes), wire.closed) for name, (_, wire) in self.sessions.items()},
        }


@settings(max_examples=300, deadline=None)
@given(stream=STREAM, cuts=st.lists(st.integers(0, 60_000), max_size=12),
       pauses=st.lists(st.booleans(), max_size=13), rate=st.sampled_from([0, 1 << 20]))
def test_the_compiled_loop_relays_exactly_what_the_python_loop_does(
        stream: list[bytes], cuts: list[int], pauses: list[bool], rate: int) -> None:
    blob = b"".join(stream)
    bounds = sorted({0, len(blob), *(cut % (len(blob) + 1) for cut in cuts)})
    reads = [blob[start:stop] for start, stop in itertools.pairwise(bounds)]
    sides = [Side(compiled=True, rate=rate), Side(compiled=False, rate=rate)]
    assert sides[0].relay.router is not None
    charges: list[list[int | None]] = [[], []]
    for index, data in enumerate(reads):
        for side, charged in zip(sides, charges, strict=True):
            receiver = side.sessions["receiver"][0]
            if index < len(pauses):
                if pauses[index]:
                    receiver.pause_writing(T0)
                elif receiver.paused_since:
                    side.relay.paused.discard(receiver)
                    receiver.resume_writing()
            charged.append(side.sessions["sender"][0].receive_data(data, T0))
    assert charges[0] == charges[1]
    assert sides[0].observed() == sides[1].observed()


def test_a_read_cut_inside_a_frame_is_completed_by_the_next(hot_path: str) -> None:
    side = Side(compiled=hot_path == "compiled", rate=0)
    frame = F.build_send_packet(RECEIVER.public().raw, b"q" * 1000)
    sender, _ = side.sessions["sender"]
    for start in range(0, len(frame), 300):
        sender.receive_data(frame[start:start + 300], T0)
    written = b"".join(side.sessions["receiver"][1].writes)
    assert written == F.build_recv_packet(SENDER.public().raw, b"q" * 1000)


def test_packets_after_a_protocol_error_in_the_same_read_are_not_relayed(hot_path: str) -> None:
    side = Side(compiled=hot_path == "compiled", rate=0)
    to_receiver = F.build_send_packet(RECEIVER.public().raw, b"before")
    after = F.build_send_packet(RECEIVER.public().raw, b"after")
    sender, _ = side.sessions["sender"]
    sender.receive_data(to_receiver + F.build_frame(F.SEND_PACKET, bytes(3)) + after, T0)
    assert sender.state != ACTIVE
    written = b"".join(side.sessions["receiver"][1].writes)
    assert written == F.build_recv_packet(SENDER.public().raw, b"before")
    assert side.relay.stats.packets_received == 1


# -- the worker mesh: packets for keys other workers own, and PACKETS messages arriving ----------------


class Link:
    """A mesh link as the router sees it: only its identity matters (mesh/transport.py's PeerLink)."""


class Forwarded:
    """The relay's forwarder as the compiled router uses it: what it was handed, per link."""

    def __init__(self) -> None:
        self.records: dict[Link, list[tuple[bytes, int]]] = {}

    def forward_records(self, *, link: Link, records: bytes, count: int) -> None:
        self.records.setdefault(link, []).append((records, count))

    def forward(self, *, dst: bytes, src: bytes, packet: F.Payload) -> bool:
        return False  # what the router leaves to Python has no remote owner here


REMOTE = PrivateKey.generate().public().raw
ORPHAN = PrivateKey.generate().public().raw  # owned by another worker with no link yet


def test_packets_for_a_key_another_worker_owns_become_mesh_records_per_link() -> None:
    side = Side(compiled=True, rate=0)
    assert side.relay.router is not None
    link, own = Link(), ("node", 0)
    side.relay.router.attach_mesh(owners={REMOTE: ("node", 1), ORPHAN: ("node", 2), UNKNOWN: own},
                                  own=own, links={("node", 1): link})
    forwarded = Forwarded()
    side.relay.forwarder = forwarded  # type: ignore[assignment]
    sender, _ = side.sessions["sender"]
    src = SENDER.public().raw
    packets = [b"one", b"p" * 1400, b""]
    stream = [F.build_send_packet(REMOTE, packet) for packet in packets]
    stream.insert(1, F.build_send_packet(RECEIVER.public().raw, b"local"))
    stream.append(F.build_send_packet(ORPHAN, b"no link"))  # left to Python: unknown destination
    sender.receive_data(b"".join(stream), T0)
    [(records, count)] = forwarded.records[link]
    assert count == 3
    assert records == b"".join(wire.packet_record(REMOTE, src, packet) for packet in packets)
    assert [(d, s, bytes(p)) for d, s, p in wire.iter_packets(b"\x01" + records)] == [
        (REMOTE, src, packet) for packet in packets]
    assert b"".join(side.sessions["receiver"][1].writes) == F.build_recv_packet(src, b"local")
    stats = side.relay.stats
    assert (stats.packets_received, stats.packets_forwarded_out, stats.drops["unknown_dest"]) == (5, 3, 1)


RECORDS = st.lists(st.tuples(st.sampled_from([RECEIVER.public().raw, OTHER.public().raw, UNKNOWN]),
                             st.sampled_from([SENDER.public().raw, UNKNOWN]), st.binary(max_size=300)),
                   max_size=20)


@settings(max_examples=200, deadline=None)
@given(records=RECORDS, tail=st.one_of(st.sampled_from([b"", b"\x00" * 10, bytes(64) + b"\xff\xff\xff\xff"]),
                                       st.binary(max_size=200)))
def test_a_mesh_message_is_delivered_by_the_compiled_loop_as_by_the_python_one(
        records: list[tuple[bytes, bytes, bytes]], tail: bytes) -> None:
    message = b"\x01" + b"".join(wire.packet_record(d, s, p) for d, s, p in records) + tail
    compiled, python = Side(compiled=True, rate=0), Side(compiled=False, rate=0)
    mesh_frames = fastpath.mesh_frames_function()
    assert mesh_frames is not None
    built = mesh_frames(message, compiled.relay.active)
    compiled.relay.deliver_mesh_frames(built)
    error = None
    try:
        python.relay.deliver_forwarded_batch(wire.iter_packets(message))
    except wire.WireError as exc:
        error = str(exc)
    assert built[4] == error
    assert compiled.observed() == python.observed()
    assert compiled.relay.sent_to == python.relay.sent_to
