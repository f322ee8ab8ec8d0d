"""Hostile input through a real mitmdump, round two (issue 21, part 2): transfer-codings the
relay cannot frame, and the option that keeps mitmdump from forwarding anywhere but the
backend. The backend is a small real HTTP server of the test's own (no model)."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.conftest import free_port
from tests.test_addon_relay import STREAM, CountingBackend, mitmdump

BODY = json.dumps({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).encode()


def raw_exchange(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on a fresh connection (``Connection: close``): status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head.encode() + b"connection: close\r\n\r\n" + body)
        out = b""
        while data := s.recv(65536):
            out += data
    head_bytes, _, rest = out.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), rest


def connect_status(port: int, target: str) -> int:
    """The status mitmdump answers a CONNECT with (a tunnel stays open: only its head is read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n".encode())
        out = b""
        while b"\r\n\r\n" not in out and (data := s.recv(65536)):
            out += data
    return int(out.split(b" ", 2)[1])


@pytest.fixture()
def other_host():
    """A second real server standing for any host a client could name: it counts connections."""
    b = CountingBackend()
    yield b
    b.shutdown()
    b.server_close()


def test_a_transfer_coding_the_relay_cannot_frame_is_a_400_not_a_backend_crash(tmp_path):
    b = CountingBackend()
    port = free_port()
    try:
        with mitmdump(port, tmp_path / "mitm.log", backend=f"http://127.0.0.1:{b.port}", capture_file=""):
            chunked = f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"
            head = (f"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
                    "transfer-encoding: {te}\r\n")
            status, body = raw_exchange(port, head.format(te="gzip, chunked"), chunked)
            assert status == 400, body  # before: mitmproxy's HTML 502 "server closed connection"
            err = json.loads(body)["error"]
            assert err["type"] == "invalid_request_error" and "Transfer-Encoding: gzip, chunked" in err["message"]
            status, body = raw_exchange(port, head.format(te="chunked"), chunked)
            assert status == 200 and b"message_stop" in body
    finally:
        b.shutdown()
        b.server_close()


def test_backend_only_forwards_nowhere_else(tmp_path, other_host):
    """Off (the default) mitmdump is a forward proxy for any host, as a regular mitmproxy is; with
    backend_only a foreign Host, an absolute-form URL and a CONNECT are refused, and the other
    host sees no connection, while API requests still reach the backend."""
    b = CountingBackend()
    elsewhere = f"127.0.0.1:{other_host.port}"
    try:
        for only in (False, True):
            port = free_port()
            with mitmdump(port, tmp_path / f"mitm-{only}.log", backend=f"http://127.0.0.1:{b.port}",
                          capture_file="", backend_only=only):
                before = other_host.accepted
                via = f"http://127.0.0.1:{port}"
                absolute = httpx.post(f"http://{elsewhere}/v1/messages", json=STREAM, timeout=60,
                                      proxy=via)  # absolute-form URL through the proxy
                status = connect_status(port, elsewhere)
                api = httpx.post(via + "/v1/messages", json=STREAM, timeout=60)
                assert api.status_code == 200 and "message_stop" in api.text
                if only:
                    assert absolute.status_code == 403 and absolute.json()["error"]["type"] == "permission_error"
                    assert "backend_only" in absolute.json()["error"]["message"]
                    assert status == 403
                    assert other_host.accepted == before  # nothing reached it
                else:
                    assert absolute.status_code == 200 and status == 200
                    assert other_host.accepted > before
    finally:
        b.shutdown()
        b.server_close()
