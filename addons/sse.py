"""Incremental Server-Sent Events decoding and Anthropic Messages stream folding. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SSEEvent:
    event: str | None
    data: str


class SSEDecoder:
    """Feed arbitrary byte chunks; get whole events back (events may span chunks)."""

    def __init__(self) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        out: list[SSEEvent] = []
        while True:
            # find the earliest line terminator (\r\n, \n or \r)
            i_n = self._buf.find(b"\n")
            i_r = self._buf.find(b"\r")
            if i_n < 0 and i_r < 0:
                break
            if i_r >= 0 and (i_n < 0 or i_r < i_n):
                if i_r == len(self._buf) - 1:
                    break  # could be the first half of \r\n: wait for more
                end, nxt = i_r, i_r + (2 if self._buf[i_r + 1:i_r + 2] == b"\n" else 1)
            else:
                end, nxt = i_n, i_n + 1
            line = self._buf[:end].decode("utf-8", "replace")
            self._buf = self._buf[nxt:]
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    def flush(self) -> list[SSEEvent]:
        """End of stream: a final unterminated event is still delivered."""
        out = self.feed(b"\n") if self._buf else []
        ev = self._line("")
        return out + ([ev] if ev else [])

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if self._event is None and not self._data:
                return None
            ev = SSEEvent(self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def encode_event(event: str, data: Any) -> bytes:
    """One SSE event in Anthropic's wire shape."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


@dataclass
class MessageFold:
    """Folds Anthropic Messages stream events (or a whole response body) into a summary."""

    usage: dict[str, int] = field(default_factory=dict)
    stop_reason: str | None = None
    content: list[dict] = field(default_factory=list)
    error: dict | None = None
    model: str | None = None
    saw_content: bool = False
    _partial_json: dict[int, str] = field(default_factory=dict)

    def add(self, ev: SSEEvent) -> bool:
        """Apply one event; returns True when it is the first content delta."""
        try:
            data = json.loads(ev.data) if ev.data else {}
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        kind = data.get("type") or ev.event
        first = False
        if kind == "message_start":
            msg = data.get("message") or {}
            self.model = msg.get("model")
            self._merge_usage(msg.get("usage"))
        elif kind == "content_block_start":
            idx = data.get("index", len(self.content))
            block = dict(data.get("content_block") or {})
            while len(self.content) <= idx:
                self.content.append({})
            self.content[idx] = block
        elif kind == "content_block_delta":
            first = not self.saw_content
            self.saw_content = True
            idx = data.get("index", 0)
            delta = data.get("delta") or {}
            while len(self.content) <= idx:
                self.content.append({})
            block = self.content[idx]
            dt = delta.get("type")
            if dt == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif dt == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
            elif dt == "signature_delta":
                block["signature"] = block.get("signature", "") + delta.get("signature", "")
            elif dt == "input_json_delta":
                self._partial_json[idx] = self._partial_json.get(idx, "") + delta.get("partial_json", "")
        elif kind == "content_block_stop":
            idx = data.get("index", 0)
            if idx in self._partial_json and idx < len(self.content):
                raw = self._partial_json.pop(idx)
                try:
                    self.content[idx]["input"] = json.loads(raw) if raw else {}
                except ValueError:
                    self.content[idx]["input_raw"] = raw
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                self.stop_reason = delta["stop_reason"]
            self._merge_usage(data.get("usage"))
        elif kind == "error":
            err = data.get("error") or {}
            self.error = {"type": str(err.get("type", "api_error")), "message": str(err.get("message", ""))}
        return first

    def add_body(self, body: Any) -> None:
        """A non-streamed Messages response (or error) body."""
        if not isinstance(body, dict):
            return
        if body.get("type") == "error":
            err = body.get("error") or {}
            self.error = {"type": str(err.get("type", "api_error")), "message": str(err.get("message", ""))}
            return
        self.model = body.get("model")
        self._merge_usage(body.get("usage"))
        self.stop_reason = body.get("stop_reason")
        if isinstance(body.get("content"), list):
            self.content = body["content"]

    def _merge_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for k, v in usage.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    self.usage[k] = v
