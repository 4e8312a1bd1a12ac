"""The server session without a socket: feed bytes and `now`, read the frames it wrote.

Every state of `ServerSession` (session.py) is driven here through its real `Relay`; the only
stand-in is the byte sink (`Wire`, the `seams.Transport` a socket would be) and the admission hook
and publication barrier, which are the relay's own seams (`seams.Admission`, a callback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from relay_worker import frames as F
from relay_worker.handshake import ClientInfo, open_server_info, seal_client_info
from relay_worker.keys import PrivateKey
from relay_worker.relay import KEEPALIVE_SLOTS, Relay
from relay_worker.seams import AdmissionSubject, Verdict
from relay_worker.session import ACTIVE, ADMITTING, CLOSED, HANDSHAKE, PONGS_PER_READ, PUBLISHING, ServerSession

T0 = 1_000.0
DISCO = F.DISCO_MAGIC + bytes(F.KEY_LEN + F.NONCE_LEN) + b"disco"


class Wire:
    """The byte stream a session writes to: records every write and what was asked of it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.reading = True
        self.closed = False
        self.aborted = False
        self._parser = F.FrameParser(F.MAX_INFO_LEN)

    def write(self, data: F.Payload) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0

    def frames(self) -> list[tuple[int, bytes]]:
        """The frames written since the last call, in order."""
        data, self.writes = b"".join(self.writes), []
        return [(t, bytes(p)) for t, p in self._parser.feed(data)]

    def types(self) -> list[int]:
        return [t for t, _ in self.frames()]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def relay(hot_path: str) -> Relay:
    relay = Relay(PrivateKey.generate())
    assert (relay.router is not None) == (hot_path == "compiled")
    return relay


def started(relay: Relay, port: int = 1, *, clock: Clock | None = None,
            preamble: bytes = b"") -> tuple[ServerSession, Wire]:
    session = ServerSession(relay, ("127.0.0.1", port), clock=clock or Clock(), preamble=preamble)
    wire = Wire()
    session.start(wire, T0)
    return session, wire


def client_info(relay: Relay, key: PrivateKey, info: ClientInfo | None = None) -> bytes:
    return seal_client_info(key, relay.server_public, info or ClientInfo())


def active(relay: Relay, port: int = 1, *, clock: Clock | None = None) -> tuple[ServerSession, Wire, bytes]:
    session, wire = started(relay, port, clock=clock)
    key = PrivateKey.generate()
    session.receive_data(client_info(relay, key), T0)
    assert session.state == ACTIVE
    assert wire.types() == [F.SERVER_KEY, F.SERVER_INFO]
    return session, wire, key.public().raw


def closed_because(caplog: pytest.LogCaptureFixture, why: str) -> bool:
    return any(why in record.getMessage() for record in caplog.records)


# -- before ClientInfo ----------------------------------------------------------------------------------


def test_start_sends_server_key_after_the_http_response_in_one_write(relay: Relay) -> None:
    session, wire = started(relay, preamble=b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert len(wire.writes) == 1 and wire.writes[0].startswith(b"HTTP/1.1 101")
    assert wire.writes[0].endswith(relay.server_key_frame)
    assert session.state == HANDSHAKE and session.handshake_deadline == T0 + relay.handshake_timeout
    assert session in relay.connections and relay.stats.accepts == 1


def test_a_frame_other_than_client_info_first_closes_with_a_protocol_error(
        relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay_worker.conn")
    session, wire = started(relay)
    wire.frames()
    session.receive_data(F.build_ping(bytes(8)), T0)
    assert session.state == CLOSED and wire.closed and not wire.frames()
    assert relay.stats.protocol_errors == 1
    assert closed_because(caplog, "protocol error: expected ClientInfo, got frame type 0x12")


def test_a_client_info_that_does_not_open_is_a_handshake_failure(relay: Relay) -> None:
    session, wire = started(relay)
    sealed = client_info(relay, PrivateKey.generate())
    session.receive_data(sealed[:-1] + bytes([sealed[-1] ^ 1]), T0)
    assert session.state == CLOSED and wire.closed
    assert relay.stats.handshake_failures == 1 and not session.registered


def test_client_info_byte_by_byte_completes_the_handshake(relay: Relay) -> None:
    session, wire = started(relay)
    for byte in client_info(relay, PrivateKey.generate()):
        session.receive_data(bytes([byte]), T0)
    assert session.state == ACTIVE and wire.types() == [F.SERVER_KEY, F.SERVER_INFO]


def test_handshake_deadline(relay: Relay) -> None:
    session, wire = started(relay)
    session.handshake_timer(T0 + relay.handshake_timeout - 0.1)
    assert session.state == HANDSHAKE and not wire.closed
    session.handshake_timer(T0 + relay.handshake_timeout)
    assert session.state == CLOSED and wire.closed and relay.stats.handshake_timeouts == 1


def test_the_handshake_deadline_no_longer_applies_once_client_info_is_in(relay: Relay) -> None:
    session, wire, _ = active(relay)
    session.handshake_timer(T0 + 3600)
    assert session.state == ACTIVE and not wire.closed and relay.stats.handshake_timeouts == 0


def test_a_full_worker_refuses_clients_but_not_mesh_peers(relay: Relay) -> None:
    relay.max_clients = 1
    active(relay, 1)
    refused, wire = started(relay, 2)
    refused.receive_data(client_info(relay, PrivateKey.generate()), T0)
    assert refused.state == CLOSED and wire.closed and relay.stats.refused_clients == 1
    relay.mesh_key = "ab" * 32
    mesh, wire = started(relay, 3)
    mesh.receive_data(client_info(relay, PrivateKey.generate(), ClientInfo(mesh_key=relay.mesh_key)), T0)
    assert mesh.state == ACTIVE and mesh.is_mesh


# -- admission ------------------------------------------------------------------------------------------


class HeldAdmission:
    """An admission hook whose verdicts the test gives (a remote verifier that has not answered)."""

    def __init__(self) -> None:
        self.asked: list[tuple[AdmissionSubject, Verdict]] = []

    def __call__(self, client: AdmissionSubject, verdict: Verdict, /) -> None:
        self.asked.append((client, verdict))


def test_admission_pending_holds_reading_and_frames_until_the_verdict(relay: Relay) -> None:
    admission = relay.admission = HeldAdmission()
    session, wire = started(relay)
    wire.frames()
    key = PrivateKey.generate()
    # ClientInfo and a Ping in one read: the Ping waits for ServerInfo
    session.receive_data(client_info(relay, key) + F.build_ping(b"12345678"), T0)
    assert session.state == ADMITTING and not wire.reading and not wire.frames()
    (subject, verdict), = admission.asked
    assert subject.key == key.public().raw and subject.peer == ("127.0.0.1", 1)
    assert session.handshake_deadline == 0.0  # admission has its own timeouts
    verdict(True, "")
    assert session.state == ACTIVE and wire.reading and session.registered
    frames = wire.frames()
    assert [t for t, _ in frames] == [F.SERVER_INFO, F.PONG] and frames[1][1] == b"12345678"
    # ServerInfo is sealed for this client
    assert open_server_info(key, relay.server_public, frames[0][1]).version == 2


def test_admission_refused_closes_with_the_reason(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay_worker.conn")
    admission = relay.admission = HeldAdmission()
    session, wire = started(relay)
    wire.frames()
    session.receive_data(client_info(relay, PrivateKey.generate()), T0)
    admission.asked[0][1](False, "not in the allow list")
    assert session.state == CLOSED and wire.closed and not wire.frames() and not session.registered
    assert relay.stats.refused_clients == 1
    assert closed_because(caplog, "refused: not in the allow list")


def test_a_verdict_for_a_client_that_already_left_is_ignored(relay: Relay) -> None:
    admission = relay.admission = HeldAdmission()
    session, _ = started(relay)
    session.receive_data(client_info(relay, PrivateKey.generate()), T0)
    session.connection_lost()
    admission.asked[0][1](True, "")
    assert session.state == CLOSED and not session.registered and session not in relay.connections


# -- publication ----------------------------------------------------------------------------------------


def test_packets_for_a_client_not_yet_published_wait_behind_server_info(relay: Relay) -> None:
    clock = Clock()
    sender, _, _ = active(relay, 1)
    barrier: list[Callable[[], None]] = []
    relay.publication_barrier = barrier.append
    session, wire = started(relay, 2, clock=clock)
    wire.frames()
    key = PrivateKey.generate()
    session.receive_data(client_info(relay, key), T0)
    assert session.state == PUBLISHING and session.registered and len(barrier) == 1
    # reachable already (derper registers first), but nothing may precede ServerInfo
    sender.receive_data(F.build_send_packet(key.public().raw, b"early"), T0)
    assert not wire.frames() and session.paused_since == T0
    clock.now = T0 + 0.25
    waits = relay.stats.publish_waits
    barrier.pop()()
    frames = wire.frames()
    assert [t for t, _ in frames] == [F.SERVER_INFO, F.RECV_PACKET] and frames[1][1][32:] == b"early"
    assert session.state == ACTIVE and not session.paused_since
    assert relay.stats.publish_waits == waits + 1 and relay.stats.publish_wait_seconds == pytest.approx(0.25)


# -- admitted -------------------------------------------------------------------------------------------


def test_packets_of_one_read_go_out_in_one_write_per_destination(relay: Relay) -> None:
    a, wa, a_key = active(relay, 1)
    _, wb, b_key = active(relay, 2)
    _, wc, c_key = active(relay, 3)
    a.receive_data(b"".join(F.build_send_packet(dst, b"p%d" % i) for i, dst in enumerate([b_key, c_key, b_key])), T0)
    assert len(wb.writes) == 1 and len(wc.writes) == 1 and not wa.writes
    assert wb.frames() == [(F.RECV_PACKET, a_key + b"p0"), (F.RECV_PACKET, a_key + b"p2")]
    assert wc.frames() == [(F.RECV_PACKET, a_key + b"p1")]
    assert relay.stats.packets_received == 3 and relay.stats.packets_sent == 3
    assert relay.sent_to[a_key] == {b_key, c_key}


def test_disco_to_an_unknown_key_answers_not_here_at_derpers_rate(relay: Relay) -> None:
    session, wire, _ = active(relay)
    nobody = PrivateKey.generate().public().raw
    for now in (T0, T0, T0, T0, T0 + 1.0):
        session.receive_data(F.build_send_packet(nobody, DISCO), now)
    session.receive_data(F.build_send_packet(nobody, b"not disco"), T0 + 5)
    gone = [F.parse_peer_gone(p) for _, p in wire.frames()]
    assert gone == [(nobody, F.PEER_GONE_NOT_HERE)] * 4  # a burst of 3, then one per second
    assert relay.stats.drops["unknown_dest"] == 6


def test_pings_a_read_answers_are_bounded(relay: Relay) -> None:
    session, wire, _ = active(relay)
    session.receive_data(b"".join(F.build_ping(b"%08d" % i) for i in range(10)), T0)
    assert [p for _, p in wire.frames()] == [b"%08d" % i for i in range(PONGS_PER_READ)]
    assert relay.stats.got_ping == 10 and relay.stats.sent_pong == PONGS_PER_READ


def test_a_reads_note_preferred_frames_cost_one_change(relay: Relay) -> None:
    session, _, _ = active(relay)
    session.receive_data(b"".join(F.build_note_preferred(i % 2 == 1) for i in range(9)), T0)
    assert session.preferred is False and relay.stats.current_home_connections == 0
    session.receive_data(F.build_note_preferred(True), T0)
    assert session.preferred and relay.stats.current_home_connections == 1


@pytest.mark.parametrize(("frame", "why"), [
    (F.build_frame(F.SEND_PACKET, b"short"), "SendPacket payload of 5 bytes"),
    (F.build_frame(F.NOTE_PREFERRED, b"\x01\x01"), "NotePreferred of 2 bytes"),
    (F.build_frame(F.WATCH_CONNS, b""), "WatchConns needs the mesh key"),
    (F.build_frame(F.WATCH_CONNS, b"x"), "WatchConns with 1 bytes of payload"),
    (F.build_frame(F.CLOSE_PEER, bytes(32)), "ClosePeer needs the mesh key"),
    (F.build_frame(F.FORWARD_PACKET, bytes(70)), "ForwardPacket needs the mesh key"),
    (F.build_frame(F.PING, b"1234"), "Ping frame too short (4 bytes)"),
    (F.frame_header(F.SEND_PACKET, F.MAX_FRAME_LEN + 1), "SendPacket frame length 65601 exceeds 65600"),
])
def test_bad_frames_close_only_this_connection_with_a_clear_reason(
        relay: Relay, caplog: pytest.LogCaptureFixture, frame: bytes, why: str) -> None:
    caplog.set_level(logging.INFO, "relay_worker.conn")
    bad, wire, bad_key = active(relay, 1)
    other, other_wire, _ = active(relay, 2)
    bad.receive_data(frame, T0)
    assert bad.state == CLOSED and wire.closed and not bad.registered and bad_key not in relay.clients
    assert other.state == ACTIVE and not other_wire.closed
    assert relay.stats.protocol_errors == 1
    assert closed_because(caplog, f"protocol error: {why}"), [r.getMessage() for r in caplog.records]


def test_unknown_frame_types_and_big_frames_of_them_are_skipped(relay: Relay) -> None:
    session, wire, _ = active(relay)
    big = F.frame_header(0x7F, F.MAX_FRAME_LEN * 2) + bytes(F.MAX_FRAME_LEN * 2)
    session.receive_data(big[:1000], T0)
    session.receive_data(big[1000:] + F.build_ping(b"after it"), T0)
    assert session.state == ACTIVE and wire.frames() == [(F.PONG, b"after it")]
    session.receive_data(F.build_frame(0x7F, b"small"), T0)
    assert session.state == ACTIVE and relay.stats.unknown_frames == 1


# -- paused writer ----------------------------------------------------------------------------------------


def test_a_paused_writer_queues_bounded_data_but_never_drops_control(relay: Relay) -> None:
    sender, _, s_key = active(relay, 1)
    receiver, wire, r_key = active(relay, 2)
    receiver.pause_writing(T0)
    assert receiver in relay.paused
    limit = relay.queue_limit
    sender.receive_data(b"".join(F.build_send_packet(r_key, b"data %d" % i) for i in range(limit + 8)), T0)
    sender.receive_data(F.build_send_packet(r_key, DISCO), T0)
    receiver.receive_data(F.build_ping(b"pingpong") + F.build_ping(b"ignored!"), T0)  # one Pong is held
    receiver.send_keepalive()  # skipped: frames are already waiting
    relay.key_gone(s_key)  # PeerGone: a control frame, held however much is queued
    assert not wire.writes
    assert relay.stats.drops["queue_head"] == 8
    receiver.resume_writing()
    assert len(wire.writes) == 1
    frames = wire.frames()
    assert frames[:2] == [(F.PONG, b"pingpong"), (F.PEER_GONE, s_key + bytes([F.PEER_GONE_DISCONNECTED]))]
    assert frames[2] == (F.RECV_PACKET, s_key + DISCO)  # disco before other packets
    assert [p[32:] for _, p in frames[3:]] == [b"data %d" % i for i in range(8, limit + 8)]
    assert receiver not in relay.paused and not receiver.paused_since
    assert relay.stats.sent_pong == 1


def test_write_deadline(relay: Relay) -> None:
    session, wire, key = active(relay)
    session.pause_writing(T0)
    relay.sweep(T0 + relay.write_timeout)
    assert not wire.aborted
    relay.sweep(T0 + relay.write_timeout + 0.1)
    assert wire.aborted and session.state == CLOSED and key not in relay.clients
    assert relay.stats.write_timeouts == 1


def test_keepalive_is_due_once_per_period_and_skipped_while_paused(relay: Relay) -> None:
    _, wire, _ = active(relay, 1)
    paused, paused_wire, _ = active(relay, 2)
    paused.pause_writing(T0)
    for tick in range(KEEPALIVE_SLOTS):
        relay.sweep(T0 + tick)
    assert wire.frames() == [(F.KEEP_ALIVE, b"")]
    assert not paused_wire.writes


# -- closed ---------------------------------------------------------------------------------------------


def test_a_closed_session_reads_nothing_and_counts_what_was_queued(relay: Relay) -> None:
    sender, _, _ = active(relay, 1)
    session, wire, key = active(relay, 2)
    session.pause_writing(T0)
    sender.receive_data(F.build_send_packet(key, b"queued"), T0)
    session.connection_lost()
    assert relay.stats.drops["gone_disconnected"] == 1
    assert session not in relay.connections and session not in relay.paused and key not in relay.clients
    session.receive_data(F.build_ping(b"too late"), T0)
    assert not wire.writes and relay.stats.got_ping == 0


def test_packets_for_a_session_whose_transport_is_gone_are_dropped(relay: Relay) -> None:
    session, wire, _ = active(relay)
    session.connection_lost()
    session.deliver_frames(F.build_recv_packet(bytes(32), b"x"), 1)
    session.deliver(src=bytes(32), packet=b"y")
    assert not wire.writes and relay.stats.drops["gone_disconnected"] == 2
