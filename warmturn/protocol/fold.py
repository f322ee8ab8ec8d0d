"""The stream fold: SSE events back into one message (like the SDK's accumulate_event).

Standard library only (see warmturn/protocol/__init__.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from warmturn.protocol.sse import SSEEvent, decode_sse

# --------------------------------------------------------------------------- stream fold


@dataclass
class MessageFold:
    """Folds Anthropic Messages stream events (or a whole response body) into a summary.

    A pure reducer with the semantics of the anthropic SDK's ``accumulate_event``: deltas apply
    only to blocks of their kind, a ``signature_delta`` sets the thinking block's signature
    (it is sent whole, not in pieces), tool input is parsed when its block stops, and usage
    fields merge with the later value winning (absent or null fields keep the earlier one).
    Unlike the SDK it never raises on odd input: a proxy must not break the stream it taps.
    """

    usage: dict[str, int] = field(default_factory=dict)
    stop_reason: str | None = None
    stop_sequence: str | None = None
    content: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    model: str | None = None
    id: str | None = None
    saw_content: bool = False
    _partial_json: dict[int, str] = field(default_factory=dict)

    def add(self, ev: SSEEvent) -> bool:
        """Apply one event; True when it is the stream's first content delta (time to first token)."""
        data = ev.json()
        if not isinstance(data, dict):
            return False
        return self.add_event(data, ev.event)

    def add_event(self, data: Mapping[str, Any], name: str | None = None) -> bool:
        """Apply one decoded event (see :meth:`add`)."""
        kind = data.get("type") or name
        if kind == "content_block_delta":
            first = not self.saw_content
            self.saw_content = True
            self._block_delta(data)
            return first
        if kind == "message_start":
            msg = data.get("message") or {}
            self.model = msg.get("model")
            self.id = msg.get("id")
            self._merge_usage(msg.get("usage"))
        elif kind == "content_block_start":
            idx = self._index(data, len(self.content))
            block = data.get("content_block")
            self._block(idx)
            self.content[idx] = dict(block) if isinstance(block, dict) else {}
        elif kind == "content_block_stop":
            self._block_stop(self._index(data, 0))
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                self.stop_reason = delta["stop_reason"]
            if "stop_sequence" in delta:
                self.stop_sequence = delta["stop_sequence"]
            self._merge_usage(data.get("usage"))
        elif kind == "error":
            self._set_error(data.get("error"))
        return False

    def _block_delta(self, data: Mapping[str, Any]) -> None:
        """A content_block_delta: applied only to a block of its kind (or one not started)."""
        idx = self._index(data, 0)
        block = self._block(idx)
        delta = data.get("delta") or {}
        dt, bt = delta.get("type"), block.get("type")
        if dt == "text_delta" and bt in ("text", None):
            block.setdefault("type", "text")
            block["text"] = block.get("text", "") + str(delta.get("text", ""))
        elif dt == "thinking_delta" and bt in ("thinking", None):
            block.setdefault("type", "thinking")
            block["thinking"] = block.get("thinking", "") + str(delta.get("thinking", ""))
        elif dt == "signature_delta" and bt in ("thinking", None):
            block["signature"] = delta.get("signature", "")
        elif dt == "input_json_delta" and bt in ("tool_use", "server_tool_use", None):
            self._partial_json[idx] = self._partial_json.get(idx, "") + str(delta.get("partial_json", ""))
        elif dt == "citations_delta" and bt in ("text", None):
            block.setdefault("citations", []).append(delta.get("citation"))

    def _block_stop(self, idx: int) -> None:
        """A content_block_stop: a tool block's input JSON is parsed now (kept raw if it does not parse)."""
        if idx in self._partial_json and idx < len(self.content):
            raw = self._partial_json.pop(idx)
            try:
                self.content[idx]["input"] = json.loads(raw) if raw else {}
            except ValueError:
                self.content[idx]["input_raw"] = raw

    def add_body(self, body: Any) -> None:
        """A non-streamed Messages response (or error) body."""
        if not isinstance(body, dict):
            return
        if body.get("type") == "error":
            self._set_error(body.get("error"))
            return
        self.model = body.get("model")
        self.id = body.get("id")
        self._merge_usage(body.get("usage"))
        self.stop_reason = body.get("stop_reason")
        self.stop_sequence = body.get("stop_sequence")
        if isinstance(body.get("content"), list):
            self.content = body["content"]

    def add_bytes(self, data: bytes) -> MessageFold:
        """A whole response: a JSON body or an SSE stream. Returns self."""
        if data.lstrip().startswith(b"{"):
            try:
                self.add_body(json.loads(data))
            except ValueError:
                pass
        else:
            for ev in decode_sse(data):
                self.add(ev)
        return self

    @property
    def text(self) -> str:
        """The text blocks joined (what a user reads)."""
        return "".join(b.get("text", "") for b in self.content if b.get("type") == "text")

    def _index(self, data: Mapping[str, Any], default: int) -> int:
        idx = data.get("index", default)
        return idx if isinstance(idx, int) and 0 <= idx < 10_000 else default

    def _block(self, idx: int) -> dict[str, Any]:
        while len(self.content) <= idx:
            self.content.append({})
        return self.content[idx]

    def _set_error(self, err: Any) -> None:
        err = err if isinstance(err, dict) else {}
        self.error = {"type": str(err.get("type", "api_error")), "message": str(err.get("message", ""))}

    def _merge_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for k, v in usage.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    self.usage[k] = v
