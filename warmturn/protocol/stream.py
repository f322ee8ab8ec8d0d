"""The event builder: the SSE events of one assistant message (MessageStream) and its usage.

Standard library only (see warmturn/protocol/__init__.py).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from warmturn.protocol.errors import error_body

# --------------------------------------------------------------------------- event builder


def new_id(prefix: str) -> str:
    """``msg_…`` / ``toolu_…`` / ``req_…`` style ids (24 random base32-ish characters)."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZabcdefghijkmnpqrstuvwxyz"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(24))


@dataclass(frozen=True)
class Usage:
    """Prompt-side token accounting of one request (Anthropic's: input excludes cache reads and writes)."""

    input_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    def as_dict(self, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": output_tokens,
        }


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"]


class MessageStream:
    """Builds one assistant message as Anthropic's streaming events and as the final message.

    Call :meth:`start`, then :meth:`text` / :meth:`tool_use` (or :meth:`open_tool` plus
    :meth:`tool_input` for arguments that arrive in pieces) as output arrives, then
    :meth:`finish`. Each returns the event dicts to send (encode them with :func:`encode_sse`);
    :meth:`message` is the non-streaming equivalent. Empty text never opens a block.

    ``usage`` is the prompt-side accounting: a :class:`Usage`, or a plain mapping sent as is
    (with ``output_tokens`` added) for engines that report only some fields.
    """

    def __init__(self, model: str, usage: Usage | Mapping[str, int] | None = None, *,
                 id: str | None = None, make_id: Callable[[str], str] = new_id) -> None:
        self.model = model
        self.usage = usage if usage is not None else Usage(0)
        self._make_id = make_id
        self.id = id or make_id("msg_")
        self._content: list[dict[str, Any]] = []
        self._open: Literal["text", "tool"] | None = None
        self._partial: list[str] = []
        self._started = False
        self._final: dict[str, Any] | None = None

    def _usage(self, output_tokens: int) -> dict[str, int]:
        if isinstance(self.usage, Usage):
            return self.usage.as_dict(output_tokens)
        return {**self.usage, "output_tokens": output_tokens}

    @property
    def started(self) -> bool:
        return self._started

    @property
    def finished(self) -> bool:
        return self._final is not None

    def start(self, *, ping: bool = True) -> list[dict[str, Any]]:
        """``message_start`` (and a ``ping``, as Anthropic sends); nothing when already started."""
        if self._started:
            return []
        self._started = True
        msg = self._skeleton()
        msg["usage"] = self._usage(0)
        return [{"type": "message_start", "message": msg}] + ([{"type": "ping"}] if ping else [])

    def _skeleton(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None}

    def _close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        if self._open == "tool":
            raw = "".join(self._partial)
            try:
                self._content[-1]["input"] = json.loads(raw) if raw else {}
            except ValueError:
                self._content[-1]["input"] = {}
            self._partial = []
        self._open = None
        return [{"type": "content_block_stop", "index": len(self._content) - 1}]

    def _begin(self, kind: Literal["text", "tool"], block: dict[str, Any], shown: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self._content.append(block)
        self._open = kind
        events.append({"type": "content_block_start", "index": len(self._content) - 1, "content_block": shown})
        return events

    def text(self, piece: str) -> list[dict[str, Any]]:
        if not piece:
            return []
        events: list[dict[str, Any]] = []
        if self._open != "text":
            events += self._begin("text", {"type": "text", "text": ""}, {"type": "text", "text": ""})
        self._content[-1]["text"] += piece
        events.append({"type": "content_block_delta", "index": len(self._content) - 1,
                       "delta": {"type": "text_delta", "text": piece}})
        return events

    def open_tool(self, name: str, id: str | None = None) -> list[dict[str, Any]]:
        """Start a ``tool_use`` block whose arguments follow through :meth:`tool_input`."""
        block = {"type": "tool_use", "id": id or self._make_id("toolu_"), "name": name, "input": {}}
        return self._begin("tool", block, dict(block))

    def tool_input(self, partial_json: str) -> list[dict[str, Any]]:
        """One ``input_json_delta`` of the open tool block."""
        if self._open != "tool":
            raise RuntimeError("tool_input() without an open tool block")
        if not partial_json:
            return []
        self._partial.append(partial_json)
        return [{"type": "content_block_delta", "index": len(self._content) - 1,
                 "delta": {"type": "input_json_delta", "partial_json": partial_json}}]

    def tool_use(self, name: str, arguments: dict[str, Any], id: str | None = None) -> list[dict[str, Any]]:
        """A whole ``tool_use`` block: start, its arguments in one delta, stop."""
        events = self.open_tool(name, id)
        events += self.tool_input(json.dumps(arguments, ensure_ascii=False))
        events += self._close()
        self._content[-1]["input"] = arguments
        return events

    @property
    def has_tool_use(self) -> bool:
        return any(b["type"] == "tool_use" for b in self._content)

    def finish(self, stop_reason: str, output_tokens: int = 0, stop_sequence: str | None = None, *,
               usage: Mapping[str, int] | None = None, empty_block: bool = True) -> list[dict[str, Any]]:
        """Close the open block, then ``message_delta`` and ``message_stop``.

        ``usage`` replaces the ``message_delta`` usage (an engine's own final counts);
        ``empty_block`` adds an empty text block when nothing was produced (clients that index
        ``content[0]`` keep working).
        """
        events = self.start() if not self._started else []
        events += self._close()
        if not self._content and empty_block:
            self._content.append({"type": "text", "text": ""})
            events += [{"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                       {"type": "content_block_stop", "index": 0}]
        final_usage = dict(usage) if usage is not None else self._usage(output_tokens)
        self._final = self._skeleton() | {"content": self._content, "stop_reason": stop_reason,
                                          "stop_sequence": stop_sequence, "usage": final_usage}
        events.append({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                       "usage": final_usage})
        events.append({"type": "message_stop"})
        return events

    def error(self, error_type: str, message: str) -> list[dict[str, Any]]:
        """An ``error`` event ending the stream (after ``message_start`` if none was sent)."""
        events = self.start(ping=False) if not self._started else []
        return events + [error_body(error_type, message)]

    def message(self) -> dict[str, Any]:
        if self._final is None:
            raise RuntimeError("message() before finish()")
        return self._final
