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

    python -m bench.record --port 8765 --out /tmp/rec.jsonl [--tool-use 'Read={"file_path": "/tmp/x"}']
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SECRET_HEADERS = {"x-api-key", "authorization", "proxy-authorization", "cookie", "set-cookie"}
REDACTED = "<redacted>"


def redact_headers(headers) -> dict[str, str]:
    """Headers as a dict (lower-case names, repeated values joined), credentials redacted."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        value = REDACTED if key in SECRET_HEADERS else value
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


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
    is_subagent = "x-claude-code-agent-id" in headers
    if tool_use and not is_subagent and tool_use[0] in tool_names and is_plain_prompt(body):
        return [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": tool_use[0], "input": tool_use[1]},
        ]
    output_format = (body.get("output_config") or {}).get("format")
    if output_format:
        return [{"type": "text", "text": json.dumps({"title": "Recorded session", "isNewTopic": True})}]
    return [{"type": "text", "text": "Done: the file says hello." if not is_subagent else "Subagent result: nothing found."}]


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def stream_events(message: dict, blocks: list[dict]) -> list[bytes]:
    """The SSE events of a streamed message with these content blocks."""
    start = dict(message, content=[], stop_reason=None)
    events = [sse("message_start", {"type": "message_start", "message": start})]
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            events.append(sse("content_block_start", {"type": "content_block_start", "index": i,
                                                      "content_block": {"type": "text", "text": ""}}))
            events.append(sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                      "delta": {"type": "text_delta", "text": block["text"]}}))
        else:
            events.append(sse("content_block_start", {"type": "content_block_start", "index": i,
                                                      "content_block": dict(block, input={})}))
            events.append(sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                      "delta": {"type": "input_json_delta",
                                                                "partial_json": json.dumps(block["input"])}}))
        events.append(sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(sse("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                                        "usage": {"output_tokens": message["usage"]["output_tokens"]}}))
    events.append(sse("message_stop", {"type": "message_stop"}))
    return events


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
        headers = redact_headers(self.headers)
        try:
            body = json.loads(body_bytes) if body_bytes else None
        except ValueError:
            body = None
        record = {"t": time.time(), "method": self.command, "path": self.path, "headers": headers,
                  "body": body if body is not None or not body_bytes else None}
        if body is None and body_bytes:
            record["body_text"] = body_bytes[:65536].decode("utf-8", "replace")
        if isinstance(body, dict):
            for k in list(body):
                if k.lower() in SECRET_HEADERS:
                    body[k] = REDACTED
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
        if self.path.startswith("/v1/models"):
            self._json(200, {"data": [{"type": "model", "id": "claude-opus-4-8", "display_name": "recorder",
                                       "created_at": "2026-01-01T00:00:00Z"}],
                             "has_more": False, "first_id": "claude-opus-4-8", "last_id": "claude-opus-4-8"})
        else:
            self._json(200, {"ok": True})

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        headers, body = self._record(self.rfile.read(length))
        if not isinstance(body, dict):
            self._json(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "body must be JSON"}})
            return
        if self.path.startswith("/v1/messages/count_tokens"):
            self._json(200, {"input_tokens": max(1, len(json.dumps(body)) // 4)})
            return
        if not self.path.startswith("/v1/messages"):
            self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
            return
        blocks = choose_reply(body, headers, self.server.tool_use)
        message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                   "model": body.get("model", "recorder"), "content": blocks,
                   "stop_reason": "tool_use" if blocks[-1]["type"] == "tool_use" else "end_turn",
                   "stop_sequence": None,
                   "usage": {"input_tokens": max(1, len(json.dumps(body)) // 4), "output_tokens": 8,
                             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}
        if not body.get("stream"):
            self._json(200, message)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        for chunk in stream_events(message, blocks):
            self.wfile.write(chunk)
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
