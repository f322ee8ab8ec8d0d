"""A small real HTTP(S) backend for fault tests, run as its own process so a test can SIGKILL it
(no tests here). It answers with bytes recorded from the real embedded server
(tests/fixtures/protocol/server_text.sse), so what it sends is Anthropic's protocol, not a
hand-written imitation; what it does is chosen per process with ``--mode``:

- ``replay``: answer every request with the whole recorded stream (chunked ``text/event-stream``);
- ``hang``: read the request, then never answer (the test kills the process: a backend that dies
  before answering);
- ``cut``: send the stream's headers and its events up to the first ``content_block_delta``, then
  stall (the test kills the process: a backend that dies mid-stream).

Each request is announced on stdout once its body is read, as ``request <METHOD> <target>
<body bytes>``, and ``streaming`` once a ``cut`` stream is under way, so a test waits for facts,
not for time. ``--cert``/``--key`` serve TLS.

    python tests/scripted_backend.py --port 8443 --mode hang --cert leaf.pem --key leaf.key
"""

from __future__ import annotations

import argparse
import http.server
import socket
import ssl
import sys
import threading
from pathlib import Path

SSE = (Path(__file__).resolve().parent / "fixtures" / "protocol" / "server_text.sse").read_bytes()


def recorded_events() -> list[bytes]:
    """The recorded stream as whole SSE events (each ends with its blank line)."""
    return [block + b"\n\n" for block in SSE.split(b"\n\n") if block.strip()]


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "replay"

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        say(f"request {self.command} {self.path} {len(body)}")
        if self.mode == "hang":
            threading.Event().wait()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for event in recorded_events():
            if self.mode == "cut" and b"content_block_delta" in event:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                say("streaming")
                threading.Event().wait()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: socket.socket, client_address) -> None:
        if self.tls is not None:  # the handshake runs on the request's thread, not the accept loop
            request = self.tls.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=("replay", "hang", "cut"), default="replay")
    ap.add_argument("--cert", help="PEM certificate chain (serve TLS)")
    ap.add_argument("--key", help="PEM private key of --cert")
    args = ap.parse_args()
    Handler.mode = args.mode
    server = Server(("127.0.0.1", args.port), Handler)
    if args.cert:
        server.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.tls.load_cert_chain(args.cert, args.key)
    say(f"listening {server.server_address[1]}")
    server.serve_forever()


if __name__ == "__main__":
    main()
