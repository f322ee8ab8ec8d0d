"""Record what a real Anthropic client (Claude Code) sends.

A tiny stdlib HTTP server on 127.0.0.1 that appends every request it receives
(method, path, headers with credentials redacted, JSON body) to a JSONL file and
answers with Anthropic-shaped responses so the client carries on:

- ``HEAD /`` and ``GET /`` -> 200
- ``GET /v1/models`` -> a one-model list
- ``POST /v1/messages/count_tokens`` -> ``{"input_tokens": chars // 4}``
- ``POST /v1/messages`` -> a valid message (SSE stream when ``stream`` is true):
  text by default; with ``--tool-use NAME=JSON`` the first turn of a conversation
  (the last message is a plain user prompt and the tool is offered) is answered
  with a ``tool_use`` block of that tool, so the client runs it and sends a
  ``tool_result`` next.

This is tooling for capturing the client's real payloads (the fixtures under
``tests/fixtures/claude_code/`` come from it), not a stand-in for a model server.

    python -m warmturn.bench.record --port 8765 --out /tmp/rec.jsonl [--tool-use 'Read={"file_path": "/tmp/x"}']
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from warmturn.protocol import (
    MessageStream,
    Usage,
    agent_id,
    encode_sse,
    error_for_status,
    model_info,
    page_models,
    redact_headers,
    redact_json,
    request_kind,
)


def is_plain_prompt(body: dict) -> bool:
    """True when the last user/assistant message is a user turn without tool_result (a fresh prompt).

    Claude Code appends role ``system`` messages after the prompt; they are skipped.
    """
    messages = [m for m in body.get("messages") or [] if m.get("role") != "system"]
    if not messages or messages[-1].get("role") != "user":
        return False
    content = messages[-1].get("content")
    if isinstance(content, str):
        return True
    return not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def choose_reply(body: dict, headers: dict[str, str], tool_use: tuple[str, dict] | None) -> list[dict]:
    """Content blocks to answer a Messages request with."""
    tool_names = {t.get("name") for t in body.get("tools") or []}
    is_subagent = agent_id(headers) is not None
    if tool_use and not is_subagent and tool_use[0] in tool_names and is_plain_prompt(body):
        return [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": tool_use[0], "input": tool_use[1]},
        ]
    output_format = (body.get("output_config") or {}).get("format")
    if output_format:
        return [{"type": "text", "text": json.dumps({"title": "Recorded session", "isNewTopic": True})}]
    return [{"type": "text", "text": "Done: the file says hello." if not is_subagent else "Subagent result: nothing found."}]


def reply(body: dict, blocks: list[dict]) -> tuple[dict, list[dict]]:
    """The message answering ``body`` with these content blocks and its stream events (the shared
    event builder's)."""
    stream = MessageStream(body.get("model", "recorder"), Usage(max(1, len(json.dumps(body)) // 4)))
    events = stream.start(ping=False)
    for block in blocks:
        if block["type"] == "text":
            events += stream.text(block["text"])
        else:
            events += stream.tool_use(block["name"], block["input"], id=block["id"])
    events += stream.finish("tool_use" if stream.has_tool_use else "end_turn", 8)
    return stream.message(), events


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, out: Path, tool_use: tuple[str, dict] | None):
        super().__init__(address, Handler)
        self.out = out
        self.tool_use = tool_use
        self.lock = threading.Lock()
        self.seq = 0

    def log_request_record(self, record: dict) -> None:
        with self.lock:
            self.seq += 1
            record["seq"] = self.seq
            with self.out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


class Handler(BaseHTTPRequestHandler):
    server: Recorder
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the JSONL is the log
        pass

    def _record(self, body_bytes: bytes) -> tuple[dict, dict | None]:
        headers = redact_headers(self.headers.items())
        try:
            body = json.loads(body_bytes) if body_bytes else None
        except ValueError:
            body = None
        record = {"t": time.time(), "method": self.command, "path": self.path, "headers": headers,
                  "body": body if body is not None or not body_bytes else None}
        if body is None and body_bytes:
            record["body_text"] = body_bytes[:65536].decode("utf-8", "replace")
        if isinstance(body, dict):
            record["body"] = redact_json(body)
        self.server.log_request_record(record)
        return headers, body

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self):
        self._record(b"")
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self):
        self._record(b"")
        if request_kind(self.path) == "models":
            self._json(200, page_models([model_info("claude-opus-4-8", "recorder", "2026-01-01T00:00:00Z")]))
        else:
            self._json(200, {"ok": True})

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        headers, body = self._record(self.rfile.read(length))
        if not isinstance(body, dict):
            self._json(400, error_for_status(400, "body must be JSON"))
            return
        kind = request_kind(self.path)
        if kind == "count_tokens":
            self._json(200, {"input_tokens": max(1, len(json.dumps(body)) // 4)})
            return
        if kind != "messages":
            self._json(404, error_for_status(404, self.path))
            return
        blocks = choose_reply(body, headers, self.server.tool_use)
        message, events = reply(body, blocks)
        if not body.get("stream"):
            self._json(200, message)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        for event in events:
            self.wfile.write(encode_sse(event))
            self.wfile.flush()
        self.close_connection = True


def parse_tool_use(spec: str | None) -> tuple[str, dict] | None:
    if not spec:
        return None
    name, _, raw = spec.partition("=")
    return name, json.loads(raw or "{}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765)")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to append requests to")
    parser.add_argument("--tool-use", help='answer a fresh prompt with this tool call: NAME=JSON input')
    args = parser.parse_args(argv)
    server = Recorder(("127.0.0.1", args.port), args.out, parse_tool_use(args.tool_use))
    print(f"recording to {args.out} on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
