"""derper's -derp=false: a node that keeps STUN, /bootstrap-dns and its home page while it is being
decommissioned, and answers every /derp request (upgrades included) with a 404."""

from __future__ import annotations

import socket

import httpx

from tests.support import ClusterProcess

UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_derp_false_refuses_every_derp_request_and_keeps_the_rest() -> None:
    with ClusterProcess("--no-derp", "--http-port", "-1") as node:
        answer = raw_exchange(node.port, UPGRADE)  # the server closes after its answer
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404 "), answer
        assert b"x-content-type-options: nosniff" in head.lower()
        assert body == b"derp server disabled\n"
        with httpx.Client(base_url=node.base, trust_env=False) as http:
            plain = http.get("/derp")
            assert (plain.status_code, plain.text) == (404, "derp server disabled\n")
            home = http.get("/")
            assert home.status_code == 200 and "<p>Status: <b>disabled</b></p>" in home.text
            assert http.get("/derp/probe").status_code == 200
        assert node.varz()["worker"]["accepts"] == 0


def test_derp_true_home_page_has_no_status_line() -> None:
    with ClusterProcess("--http-port", "-1") as node, httpx.Client(base_url=node.base, trust_env=False) as http:
        assert "Status:" not in http.get("/").text
        assert http.get("/derp").status_code == 426
