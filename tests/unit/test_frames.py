"""The wire codec: builders and parsers round-trip; the incremental parser copes with any chunking."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_worker import frames as F
from relay_worker.handshake import (
    ClientInfo,
    ServerInfo,
    mesh_key_matches,
    open_client_info,
    open_server_info,
    seal_client_info,
    seal_server_info,
)
from relay_worker.keys import KeyError_, PrivateKey, PublicKey

KEY = bytes(range(32))
OTHER = bytes(range(32, 64))


def parse_one(frame: bytes) -> tuple[int, bytes]:
    frames = F.FrameParser(F.MAX_FRAME_LEN).feed(frame)
    assert len(frames) == 1
    frame_type, payload = frames[0]
    return frame_type, bytes(payload)


def test_every_frame_type_round_trips() -> None:
    assert F.parse_server_key(parse_one(F.build_server_key(KEY))[1]) == KEY
    assert F.parse_send_packet(parse_one(F.build_send_packet(KEY, b"pkt"))[1]) == (KEY, b"pkt")
    assert F.parse_recv_packet(parse_one(F.build_recv_packet(KEY, b"pkt"))[1]) == (KEY, b"pkt")
    assert F.parse_forward_packet(parse_one(F.build_forward_packet(KEY, OTHER, b"p"))[1]) == (KEY, OTHER, b"p")
    assert parse_one(F.KEEP_ALIVE_FRAME) == (F.KEEP_ALIVE, b"")
    assert F.parse_note_preferred(parse_one(F.build_note_preferred(True))[1]) is True
    assert F.parse_note_preferred(parse_one(F.build_note_preferred(False))[1]) is False
    assert F.parse_peer_gone(parse_one(F.build_peer_gone(KEY, F.PEER_GONE_NOT_HERE))[1]) == (KEY, 1)
    assert F.parse_peer_gone(KEY) == (KEY, F.PEER_GONE_DISCONNECTED)  # old servers: bare key
    present = F.parse_peer_present(parse_one(F.build_peer_present(KEY, bytes(15) + b"\x01", 41641, 0x05))[1])
    assert present == F.PeerPresent(KEY, bytes(15) + b"\x01", 41641, 0x05)
    assert F.parse_peer_present(KEY) == F.PeerPresent(KEY)
    assert parse_one(F.WATCH_CONNS_FRAME) == (F.WATCH_CONNS, b"")
    assert F.parse_close_peer(parse_one(F.build_close_peer(KEY))[1]) == KEY
    assert F.parse_ping(parse_one(F.build_ping(b"12345678"))[1]) == b"12345678"
    assert F.parse_pong(parse_one(F.build_pong(b"12345678"))[1]) == b"12345678"
    assert F.parse_health(parse_one(F.build_health("dup"))[1]) == "dup"
    assert F.parse_restarting(parse_one(F.build_restarting(1500, 30000))[1]) == (1500, 30000)
    ftype, payload = parse_one(F.build_client_info(KEY, bytes(24), b"box"))
    assert ftype == F.CLIENT_INFO and F.parse_client_info(payload) == (KEY, bytes(24), b"box")
    assert F.parse_server_info(parse_one(F.build_server_info(bytes(24), b"box"))[1]) == (bytes(24), b"box")


def test_magic_and_header_layout() -> None:
    assert bytes.fromhex("44455250f09f9491") == F.MAGIC
    frame = F.build_send_packet(KEY, b"x")
    assert frame[:5] == bytes([0x04, 0, 0, 0, 33])


@pytest.mark.parametrize(
    ("parser", "payload"),
    [
        (F.parse_server_key, F.MAGIC),
        (F.parse_server_key, b"XXXXXXXX" + KEY),
        (F.parse_send_packet, KEY[:31]),
        (F.parse_send_packet, KEY + bytes(F.MAX_PACKET_SIZE + 1)),
        (F.parse_forward_packet, KEY + OTHER[:5]),
        (F.parse_ping, b"1234567"),
        (F.parse_ping, bytes(1001)),
        (F.parse_close_peer, KEY + b"x"),
        (F.parse_client_info, KEY),
        (F.parse_restarting, b"1234"),
        (F.parse_note_preferred, b""),
    ],
)
def test_malformed_payloads_raise_protocol_error(parser: object, payload: bytes) -> None:
    with pytest.raises(F.ProtocolError):
        parser(payload)  # type: ignore[operator]


def test_oversized_length_is_refused_at_the_header() -> None:
    parser = F.FrameParser(F.MAX_FRAME_LEN)
    with pytest.raises(F.ProtocolError):
        parser.feed(bytes([F.SEND_PACKET]) + (2 << 30).to_bytes(4, "big"))
    assert F.FrameParser(F.MAX_INFO_LEN).feed(F.frame_header(F.CLIENT_INFO, 10)) == []


def test_one_byte_at_a_time() -> None:
    stream = F.build_send_packet(KEY, b"a" * 300) + F.KEEP_ALIVE_FRAME + F.build_ping(b"abcdefgh")
    parser = F.FrameParser(F.MAX_FRAME_LEN)
    frames = []
    for byte in stream:
        frames += parser.feed(bytes([byte]))
    assert [t for t, _ in frames] == [F.SEND_PACKET, F.KEEP_ALIVE, F.PING]
    assert parser.buffered() == 0


frame_strategy = st.one_of(
    st.builds(F.build_send_packet, st.just(KEY), st.binary(max_size=2000)),
    st.builds(F.build_ping, st.binary(min_size=8, max_size=8)),
    st.just(F.KEEP_ALIVE_FRAME),
    st.builds(F.build_frame, st.integers(0, 255), st.binary(max_size=300)),
)


@given(st.lists(frame_strategy, max_size=12), st.data())
@settings(max_examples=200, deadline=None)
def test_any_chunking_yields_the_same_frames(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    parser = F.FrameParser(F.MAX_FRAME_LEN)
    got = []
    last = 0
    for cut in [*cuts, len(stream)]:
        got += parser.feed(stream[last:cut])
        last = cut
    assert b"".join(F.build_frame(t, p) for t, p in got) == stream


@given(st.binary(max_size=3000), st.lists(st.integers(1, 64), max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_bytes_in_any_chunks_yield_frames_or_protocol_error(blob: bytes, sizes: list[int]) -> None:
    parser = F.FrameParser(1024)
    pos = 0
    try:
        for size in [*sizes, len(blob)]:
            for frame_type, payload in parser.feed(blob[pos : pos + size]):
                assert 0 <= frame_type <= 255 and len(payload) <= 1024
            pos += size
    except F.ProtocolError:
        pass


def test_handshake_boxes_round_trip_and_reject_tampering() -> None:
    server, client = PrivateKey.generate(), PrivateKey.generate()
    frame = seal_client_info(client, server.public().raw, ClientInfo(mesh_key="ab" * 32, is_prober=True))
    _ftype, payload = parse_one(frame)
    key, info = open_client_info(server, payload)
    assert key == client.public().raw and info.mesh_key == "ab" * 32 and info.is_prober and info.version == 2
    tampered = payload[:-1] + bytes([payload[-1] ^ 1])
    with pytest.raises(F.ProtocolError):
        open_client_info(server, tampered)
    with pytest.raises(F.ProtocolError):
        open_client_info(PrivateKey.generate(), payload)
    reply = seal_server_info(server, client.public().raw, ServerInfo(token_bucket_bytes_per_second=1000,
                                                                     token_bucket_bytes_burst=5000))
    info2 = open_server_info(client, server.public().raw, parse_one(reply)[1])
    assert (info2.version, info2.token_bucket_bytes_per_second, info2.token_bucket_bytes_burst) == (2, 1000, 5000)


def test_mesh_key_comparison() -> None:
    assert mesh_key_matches("AB" * 32, "ab" * 32)
    assert not mesh_key_matches("ab" * 32, "")
    assert not mesh_key_matches("", "ab" * 32)
    assert not mesh_key_matches("ac" * 32, "ab" * 32)


def test_key_text_forms() -> None:
    key = PrivateKey.generate()
    pub = key.public()
    assert PublicKey.parse(pub.nodekey()) == pub
    assert PublicKey.parse(pub.hex()) == pub
    assert str(pub).startswith("nodekey:") and len(str(pub)) == 8 + 64
    assert PrivateKey.parse(key.text()) == key
    assert "privkey" not in repr(key)
    for bad in ("nodekey:zz", "nodekey:" + "00" * 31, "bogus:" + "00" * 32):
        with pytest.raises(KeyError_):
            PublicKey.parse(bad)


def test_disco_detection() -> None:
    assert F.looks_like_disco(F.DISCO_MAGIC + os.urandom(56))
    assert not F.looks_like_disco(F.DISCO_MAGIC + os.urandom(55))
    assert not F.looks_like_disco(b"\x00" * 100)
