"""Replay of recorded vLLM exchanges (tests/fixtures/vllm/), byte for byte. Helpers, no tests here.

The fixtures are raw HTTP/1.1 responses as a real vLLM sent them (tests/engines/record_vllm.py):
status line, headers and the chunked body with its framing. `Recorded` parses one into its HTTP
chunks, for the addon's stream callable in unit tests; `ReplayServer` sends it back verbatim,
one HTTP chunk per write, to a real mitmdump, and keeps what it received for assertions.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vllm"


@dataclass
class Recorded:
    name: str
    raw: bytes
    status: int
    headers: list[tuple[str, str]]
    head: bytes  # status line + headers + blank line, as recorded
    frames: list[bytes]  # the body's HTTP chunks with their framing (or the whole body)
    chunks: list[bytes]  # the body's HTTP chunks, unframed (the terminating zero-length chunk left out)
    request: dict

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self):
        return json.loads(self.body)


def load(name: str) -> Recorded:
    """Parse tests/fixtures/vllm/<name>.http (and its request)."""
    raw = (FIXTURES / f"{name}.http").read_bytes()
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    frames, chunks = [], []
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        pos = 0
        while pos < len(rest):
            eol = rest.index(b"\r\n", pos)
            size = int(rest[pos:eol].split(b";")[0], 16)
            end = eol + 2 + size + 2
            frames.append(rest[pos:end])
            if size == 0:
                break
            chunks.append(rest[eol + 2:eol + 2 + size])
            pos = end
    else:
        frames, chunks = [rest], [rest]
    request = json.loads((FIXTURES / f"{name}.request.json").read_text())
    return Recorded(name, raw, status, headers, head + b"\r\n\r\n", frames, chunks, request)


@dataclass
class ReplayServer:
    """Answers POSTs with recorded exchanges: `routes` maps a request path (query ignored) to a
    fixture name. Each HTTP chunk is written separately (with `gap` seconds between) so the proxy
    reads them one by one, as it would from vLLM. Requests it got are kept in `received`."""

    routes: dict[str, str]
    gap: float = 0.01
    received: list[dict] = field(default_factory=list)

    def __enter__(self) -> ReplayServer:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not, on Linux)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "the replay server's accept loop did not stop"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                block = conn.recv(65536)
                if not block:
                    return
                data += block
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(body) < length:
                block = conn.recv(65536)
                if not block:
                    break
                body += block
            path = target.split("?", 1)[0]
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = None
            self.received.append({"method": method, "path": path, "headers": headers, "body": parsed})
            name = self.routes.get(path)
            if name is None:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return
            rec = load(name)
            conn.sendall(rec.head)
            for frame in rec.frames:
                time.sleep(self.gap)
                conn.sendall(frame)
