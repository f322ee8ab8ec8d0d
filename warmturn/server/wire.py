"""Anthropic Messages request JSON -> dataclasses, for the server.

Pure: nothing here knows about HTTP, MLX or the tokenizer. ``parse_messages_request``
validates a decoded request body and raises :class:`RequestError` (a ``ValueError``) with
a message fit to send back as an ``invalid_request_error``; :func:`decode_json` turns the raw
bytes into that body, refusing what would break later stages (deep nesting, huge integers,
lone surrogates) with the path of the offending field. The response side (the event builder
:class:`MessageStream`, SSE encoding, error bodies, model listings) is :mod:`warmturn.protocol`'s,
shared with the addon, the bench and the analysis: import it from there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from warmturn.protocol import RequestError

Role = Literal["user", "assistant", "system"]


# --------------------------------------------------------------------------- JSON decoding

MAX_JSON_DEPTH = 64  # Claude Code's deepest tool schema nests ~12 levels inside the body
MAX_INT_DIGITS = 20  # every integer field fits in 64 bits; longer ones are refused, not parsed


class _LongInt(str):
    """An integer literal with too many digits, kept as text so its field can be named."""


def _parse_int(text: str) -> int | _LongInt:
    return _LongInt(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _problem(value: Any, depth: int) -> str | None:
    """What is wrong with this one value (not its children), or None."""
    if depth > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, _LongInt):
        return f"integer with {len(value.lstrip('-'))} digits (at most {MAX_INT_DIGITS})"
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"lone surrogate {value[e.start]!r} at character {e.start}: not valid Unicode text"
    return None


def _children(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(k, v) for k, v in value.items()]
    if isinstance(value, list):
        return [(str(i), v) for i, v in enumerate(value)]
    return []


def _locate(root: Any) -> tuple[str, str] | None:
    """(dotted path, problem) of the first bad value, depth first; keys count as values."""
    stack: list[tuple[Any, tuple[str, ...], int]] = [(root, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        why = _problem(value, depth)
        if why:
            return ".".join(path) or "request body", why
        for key, child in reversed(_children(value)):
            key_why = _problem(key, 0) if isinstance(value, dict) else None
            if key_why:
                return ".".join(path + (f"<key {key.encode('utf-8', 'backslashreplace').decode()!r}>",)), key_why
            stack.append((child, path + (key,), depth + 1))
    return None


def _first_problem(root: Any) -> bool:
    """True if anything in `root` is too deep, too long an integer or not valid Unicode. The
    fast pass: no paths are built (a large body holds millions of values)."""
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        value, depth = stack.pop()
        if _problem(value, depth):
            return True
        if isinstance(value, dict):
            for k, v in value.items():
                if _problem(k, 0):
                    return True
                stack.append((v, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return False


def decode_json(raw: bytes) -> Any:
    """Decode a request body. Raises :class:`RequestError` naming the field for invalid UTF-8 or
    JSON, NaN/Infinity, nesting deeper than ``MAX_JSON_DEPTH``, integers longer than
    ``MAX_INT_DIGITS`` digits and lone surrogates (``"\\ud800"`` escapes) in any string or key."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"request body: not valid UTF-8 at byte {e.start}") from None
    try:
        body = json.loads(text, parse_int=_parse_int, parse_constant=_no_constants)
    except RecursionError:
        raise RequestError(f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    except ValueError as e:  # NaN / Infinity
        raise RequestError(f"request body: {e}") from None
    if _first_problem(body):
        where, why = _locate(body) or ("request body", "invalid")
        if len(where) > 120:
            where = where[:60] + "…" + where[-40:]
        raise RequestError(f"{where}: {why}")
    return body


# --------------------------------------------------------------------------- request model


@dataclass(frozen=True)
class TextBlock:
    text: str


@dataclass(frozen=True)
class ToolUseBlock:
    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class ToolResultBlock:
    tool_use_id: str
    content: str
    is_error: bool = False


Block = TextBlock | ToolUseBlock | ToolResultBlock


@dataclass(frozen=True)
class Message:
    role: Role
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    messages: tuple[Message, ...]
    system: tuple[str, ...] = ()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    max_tokens: int | None = None
    stream: bool = False
    stop_sequences: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    output_schema: dict[str, Any] | None = None


_DROPPED_BLOCKS = {"thinking", "redacted_thinking"}
_IMAGE_BLOCKS = {"image", "document"}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise RequestError(message)


def _block_type(block: dict[str, Any], where: str) -> Any:
    kind = block.get("type")
    _require(isinstance(kind, str), f"{where}.type: expected a string")
    return kind


def _text_of(content: Any, where: str) -> str:
    """Text of a string or a list of text blocks (tool_result content, system)."""
    if isinstance(content, str):
        return content
    _require(isinstance(content, list), f"{where}: expected a string or a list of content blocks")
    parts = (_text_block(block, f"{where}.{i}") for i, block in enumerate(content))
    return "\n".join(p for p in parts if p is not None)


def _text_block(block: Any, where: str) -> str | None:
    """The text of one text block (None for a dropped thinking block)."""
    _require(isinstance(block, dict), f"{where}: expected an object")
    kind = _block_type(block, where)
    if kind == "text":
        _require(isinstance(block.get("text"), str), f"{where}.text: Field required")
        return block["text"]
    if kind in _IMAGE_BLOCKS:
        raise RequestError(f"{where}: {kind} content is not supported: the served model has no vision")
    if kind in _DROPPED_BLOCKS:
        return None
    raise RequestError(f"{where}.type: unsupported content block type {kind!r}")


def _parse_block(block: Any, where: str) -> Block | None:
    _require(isinstance(block, dict), f"{where}: expected an object")
    kind = _block_type(block, where)
    if kind == "text":
        _require(isinstance(block.get("text"), str), f"{where}.text: Field required")
        return TextBlock(block["text"])
    if kind == "tool_use":
        _require(isinstance(block.get("id"), str), f"{where}.id: Field required")
        _require(isinstance(block.get("name"), str), f"{where}.name: Field required")
        inp = block.get("input", {})
        _require(isinstance(inp, dict), f"{where}.input: expected an object")
        return ToolUseBlock(block["id"], block["name"], inp)
    if kind == "tool_result":
        _require(isinstance(block.get("tool_use_id"), str), f"{where}.tool_use_id: Field required")
        content = block.get("content", "")
        is_error = block.get("is_error", False)
        _require(is_error is None or isinstance(is_error, bool), f"{where}.is_error: expected a boolean")
        return ToolResultBlock(block["tool_use_id"], _text_of(content, f"{where}.content"), bool(is_error))
    if kind in _DROPPED_BLOCKS:
        return None
    if kind in _IMAGE_BLOCKS:
        raise RequestError(f"{where}: {kind} content is not supported: the served model has no vision")
    if kind in ("server_tool_use", "web_search_tool_result", "search_result"):
        raise RequestError(f"{where}.type: {kind!r} blocks are not supported by this server")
    raise RequestError(f"{where}.type: unknown content block type {kind!r}")


def _parse_message(msg: Any, where: str) -> Message:
    _require(isinstance(msg, dict), f"{where}: expected an object")
    role = msg.get("role")
    _require(role in ("user", "assistant", "system"), f"{where}.role: expected 'user', 'assistant' or 'system'")
    _require("content" in msg, f"{where}.content: Field required")
    content = msg["content"]
    if isinstance(content, str):
        return Message(role, (TextBlock(content),))
    _require(isinstance(content, list), f"{where}.content: expected a string or a list of content blocks")
    blocks = []
    for i, b in enumerate(content):
        parsed = _parse_block(b, f"{where}.content.{i}")
        if parsed is not None:
            blocks.append(parsed)
    if role == "system":
        _require(all(isinstance(b, TextBlock) for b in blocks), f"{where}.content: system messages hold text only")
    return Message(role, tuple(blocks))


def _parse_tools(tools: Any) -> tuple[Tool, ...]:
    _require(isinstance(tools, list), "tools: expected a list")
    out = []
    for i, t in enumerate(tools):
        _require(isinstance(t, dict), f"tools.{i}: expected an object")
        _require(isinstance(t.get("name"), str) and t["name"], f"tools.{i}.name: Field required")
        if "input_schema" not in t:
            # Server tools (web_search, bash_20250124, ...) carry a `type` and no schema: the
            # model cannot run them here, so they are skipped rather than rejected.
            _require("type" in t and t.get("type") != "custom", f"tools.{i}.input_schema: Field required")
            continue
        schema = t["input_schema"]
        _require(isinstance(schema, dict), f"tools.{i}.input_schema: expected an object")
        desc = t.get("description", "")
        _require(isinstance(desc, str), f"tools.{i}.description: expected a string")
        out.append(Tool(t["name"], desc, schema))
    return tuple(out)


def _parse_tool_choice(tc: Any) -> ToolChoice:
    if tc is None:
        return ToolChoice()
    _require(isinstance(tc, dict), "tool_choice: expected an object")
    kind = tc.get("type")
    _require(kind in ("auto", "any", "tool", "none"), "tool_choice.type: expected auto, any, tool or none")
    if kind == "tool":
        _require(isinstance(tc.get("name"), str), "tool_choice.name: Field required")
    return ToolChoice(kind, tc.get("name"))


def _number(body: Mapping[str, Any], key: str, kind: type, lo: float, hi: float | None) -> Any:
    v = body.get(key)
    if v is None:
        return None
    _require(isinstance(v, (int, float)) and not isinstance(v, (bool, _LongInt)), f"{key}: expected a number")
    if isinstance(v, float):
        _require(math.isfinite(v), f"{key}: expected a finite number")
        if kind is int:
            _require(v.is_integer(), f"{key}: expected an integer")
            v = int(v)
    # compared as Python numbers (exact for any int): no float() of a huge integer
    _require(v >= lo and (hi is None or v <= hi), f"{key}: out of range")
    if kind is int:
        _require(v < 2**63, f"{key}: out of range")
    return kind(v)


def _output_schema(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """``output_config.format`` (or the older top-level ``output_format``) json_schema, if any."""
    config = body.get("output_config")
    _require(config is None or isinstance(config, dict), "output_config: expected an object")
    fmt = (config or {}).get("format")
    _require(fmt is None or isinstance(fmt, dict), "output_config.format: expected an object")
    old = body.get("output_format")
    _require(old is None or isinstance(old, dict), "output_format: expected an object")
    for f in (fmt, old):
        if isinstance(f, dict) and f.get("type") == "json_schema":
            schema = f.get("schema")
            return schema if isinstance(schema, dict) else {}
    return None


def parse_messages_request(body: Any, *, count_only: bool = False) -> MessagesRequest:
    """Validate a decoded ``/v1/messages`` (or ``count_tokens``) body.

    Unknown and unused fields (``metadata``, ``thinking``, ``context_management``,
    ``cache_control``...) are ignored. Raises :class:`RequestError` on what the client must fix.
    """
    _require(isinstance(body, dict), "request body: expected a JSON object")
    model = body.get("model")
    _require(isinstance(model, str) and model != "", "model: Field required")
    _require("messages" in body, "messages: Field required")
    raw = body["messages"]
    _require(isinstance(raw, list), "messages: expected a list")
    _require(len(raw) > 0, "messages: at least one message is required")
    messages = tuple(_parse_message(m, f"messages.{i}") for i, m in enumerate(raw))
    max_tokens = _number(body, "max_tokens", int, 1, None)  # checked when present, even for a count
    if not count_only:
        _require(max_tokens is not None, "max_tokens: Field required")
    else:
        max_tokens = None
    system: tuple[str, ...] = ()
    if body.get("system") is not None:
        sys_field = body["system"]
        if isinstance(sys_field, str):
            system = (sys_field,) if sys_field else ()
        else:
            _require(isinstance(sys_field, list), "system: expected a string or a list of text blocks")
            system = tuple(_text_block(b, f"system.{i}") or "" for i, b in enumerate(sys_field))
    stops = body.get("stop_sequences") or []
    _require(
        isinstance(stops, list) and all(isinstance(s, str) and s for s in stops),
        "stop_sequences: expected a list of non-empty strings",
    )
    stream = body.get("stream", False)
    _require(isinstance(stream, bool), "stream: expected a boolean")
    tools = _parse_tools(body["tools"]) if body.get("tools") is not None else ()
    tool_choice = _parse_tool_choice(body.get("tool_choice"))
    if tool_choice.type == "tool":
        names = {t.get("name") for t in body.get("tools") or () if isinstance(t, dict)}  # server tools too
        _require(tool_choice.name in names,
                 f"tool_choice.name: no tool named {tool_choice.name!r} in tools")
    return MessagesRequest(
        model=model,
        messages=messages,
        system=system,
        tools=tools,
        tool_choice=tool_choice,
        max_tokens=max_tokens,
        stream=stream,
        stop_sequences=tuple(stops),
        temperature=_number(body, "temperature", float, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 0.0, 1.0),
        top_k=_number(body, "top_k", int, 0, None),
        output_schema=_output_schema(body),
    )


# --------------------------------------------------------------------------- responses


def count_tokens_body(input_tokens: int) -> dict[str, int]:
    return {"input_tokens": input_tokens}
