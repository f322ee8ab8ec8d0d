"""Streaming post-processing of generated text: stop sequences and tool calls. Pure.

Generation produces text in arbitrary pieces (a marker like ``<tool_call>`` can arrive split
over several tokens). :class:`StopMatcher` and :class:`ToolCallParser` consume pieces and
return what may be shown now, holding back only the characters that could still start a
stop sequence or a tool-call marker.

Formats: hermes ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` by default (a body
that cannot be a JSON object, by its first character, is text at once, not held to its end);
when the tokenizer was loaded by mlx-lm with a tool parser (inferred from the chat template:
qwen3_coder, mistral, pythonic, glm47, ...), its markers and parse function are used instead
(:func:`format_for_tokenizer`). A call whose body does not parse comes back as plain text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


Segment = TextPiece | ToolCall


def _held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


# --------------------------------------------------------------------------- stop sequences


class StopMatcher:
    """Cut generated text at the first of ``stops``.

    ``feed(piece)`` returns ``(text_to_emit, matched_stop_or_None)``; after a match, further
    input is ignored. ``flush()`` releases what was held back when generation ends otherwise.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._buf = ""
        self.matched: str | None = None

    def feed(self, piece: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        if not self.stops:
            return piece, None
        self._buf += piece
        first: tuple[int, str] | None = None
        for s in self.stops:
            i = self._buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            out = self._buf[: first[0]]
            self._buf = ""
            self.matched = first[1]
            return out, first[1]
        keep = _held_suffix(self._buf, self.stops)
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        return out, None

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


# --------------------------------------------------------------------------- tool calls

ParseFn = Callable[[str, Any], Any]


def parse_hermes(body: str, tools: Any = None) -> dict[str, Any]:
    """``{"name": ..., "arguments": {...}}`` (``arguments`` may be a JSON string or named
    ``parameters``). Raises ``ValueError`` on anything else."""
    obj = json.loads(body.strip())
    if not isinstance(obj, dict):
        raise ValueError("tool call is not a JSON object")
    return obj


def hermes_may_parse(body: str) -> bool:
    """False once ``body`` (what follows ``<tool_call>`` so far) can no longer become a call
    :func:`parse_hermes` accepts: its first character that is not whitespace is not ``{``."""
    head = body.lstrip()
    return not head or head[0] == "{"


@dataclass(frozen=True)
class ToolCallFormat:
    start: str
    end: str  # "" when a call runs to the end of the output
    parse: ParseFn
    name: str = "hermes"
    # given the body so far, False once it cannot parse whatever follows (None: not known, so a
    # body is held until its end marker or the end of the output)
    may_parse: Callable[[str], bool] | None = None


HERMES = ToolCallFormat("<tool_call>", "</tool_call>", parse_hermes, "hermes", hermes_may_parse)


def format_for_tokenizer(tokenizer: Any) -> ToolCallFormat:
    """The tool-call format of an mlx-lm ``TokenizerWrapper`` (hermes when it has none)."""
    if getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_call_start:
        return ToolCallFormat(
            tokenizer.tool_call_start,
            tokenizer.tool_call_end or "",
            tokenizer.tool_parser,
            name=getattr(tokenizer, "init_kwargs", {}).get("tool_parser_type", "mlx-lm"),
        )
    return HERMES


def normalize_call(obj: Any) -> list[ToolCall]:
    """Parser output (one call dict or a list of them) -> ToolCalls; ``ValueError`` if malformed."""
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("tool call is not an object")
        if isinstance(item.get("function"), dict):  # OpenAI-style wrapper
            item = item["function"]
        name = item.get("name")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        if args is None:
            args = {}
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            raise ValueError("tool call needs a string name and object arguments")
        calls.append(ToolCall(name, args))
    if not calls:
        raise ValueError("empty tool call")
    return calls


class ToolCallParser:
    """Split streamed text into :class:`TextPiece` and :class:`ToolCall` segments.

    ``feed(piece)`` returns the segments complete so far; ``finish()`` the rest (a call left
    open at the end of generation is parsed if its body is complete, else returned as text).
    Malformed calls become text, including their markers, never an exception.
    """

    def __init__(self, fmt: ToolCallFormat = HERMES, tools: Any = None) -> None:
        self.fmt = fmt
        self.tools = tools
        self._buf = ""
        self._in_call = False
        self.calls = 0

    def _parse(self, body: str) -> list[ToolCall] | None:
        try:
            calls = normalize_call(self.fmt.parse(body, self.tools))
        except Exception:  # noqa: BLE001 - any parser failure means "not a tool call": show the text
            return None
        self.calls += len(calls)
        return calls

    def feed(self, piece: str) -> list[Segment]:
        self._buf += piece
        out: list[Segment] = []
        start, end = self.fmt.start, self.fmt.end
        while True:
            if not self._in_call:
                i = self._buf.find(start)
                if i < 0:
                    keep = _held_suffix(self._buf, [start])
                    text = self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep :]
                    if text:
                        out.append(TextPiece(text))
                    return out
                if i > 0:
                    out.append(TextPiece(self._buf[:i]))
                self._buf = self._buf[i + len(start) :]
                self._in_call = True
            else:
                if self.fmt.may_parse is not None and not self.fmt.may_parse(self._buf):
                    # not a call after all (a model that writes "<tool_call>" and then prose):
                    # the marker is text, shown now, and what follows is read as text again
                    out.append(TextPiece(start))
                    self._in_call = False
                    continue
                if not end:
                    return out  # runs to the end of output: wait for finish()
                j = self._buf.find(end)
                if j < 0:
                    return out
                body = self._buf[:j]
                self._buf = self._buf[j + len(end) :]
                self._in_call = False
                calls = self._parse(body)
                if calls is None:
                    out.append(TextPiece(start + body + end))
                else:
                    out.extend(calls)

    def finish(self) -> list[Segment]:
        out: list[Segment] = []
        if self._in_call:
            calls = self._parse(self._buf) if self._buf.strip() else None
            if calls is None:
                out.append(TextPiece(self.fmt.start + self._buf))
            else:
                out.extend(calls)
        elif self._buf:
            out.append(TextPiece(self._buf))
        self._buf = ""
        self._in_call = False
        return out


def merge_text(segments: Sequence[Segment]) -> list[Segment]:
    """Adjacent TextPieces joined (for comparing outputs independent of piece boundaries)."""
    out: list[Segment] = []
    for s in segments:
        if isinstance(s, TextPiece) and out and isinstance(out[-1], TextPiece):
            out[-1] = TextPiece(out[-1].text + s.text)
        elif not (isinstance(s, TextPiece) and not s.text):
            out.append(s)
    return out


def extract_json(text: str) -> str | None:
    """The first JSON object embedded in ``text`` (for ``output_config.format``), or None."""
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            return text[i:end]
        i = text.find("{", end)
    return None


# --------------------------------------------------------------------------- assembly


class OutputAssembler:
    """Generated text pieces -> Anthropic events, through stop sequences and the tool parser.

    ``feed(piece)`` returns ``(events, stop_hit)``; once a stop sequence matched, the caller
    should end generation and call :meth:`finish`. With ``json_mode`` (``output_config.format``)
    text is held until the end and the first JSON object in it is sent as the answer.
    ``stream`` is a :class:`warmturn.protocol.MessageStream` (already started by the caller).
    """

    def __init__(self, stream: Any, stops: Sequence[str] = (), fmt: ToolCallFormat | None = HERMES,
                 tools: Any = None, json_mode: bool = False) -> None:
        self.stream = stream
        self.stops = StopMatcher(stops)
        self.parser = ToolCallParser(fmt, tools) if fmt is not None else None
        self.json_mode = json_mode
        self._held: list[str] = []

    def _events(self, segments: Sequence[Segment]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for s in segments:
            if isinstance(s, ToolCall):
                events += self.stream.tool_use(s.name, s.arguments)
            elif self.json_mode:
                self._held.append(s.text)
            else:
                events += self.stream.text(s.text)
        return events

    def _segments(self, text: str, final: bool) -> list[Segment]:
        if self.parser is None:
            return [TextPiece(text)] if text else []
        segs = self.parser.feed(text) if text else []
        return segs + self.parser.finish() if final else segs

    def feed(self, piece: str) -> tuple[list[dict[str, Any]], bool]:
        if self.stops.matched is not None:
            return [], True
        text, matched = self.stops.feed(piece)
        return self._events(self._segments(text, final=matched is not None)), matched is not None

    def finish(self, reason: str, output_tokens: int) -> list[dict[str, Any]]:
        """``reason`` is the engine's: "stop" (end of turn), "length", "cancelled" or "timeout"."""
        events: list[dict[str, Any]] = []
        if self.stops.matched is None:
            events += self._events(self._segments(self.stops.flush(), final=True))
        if self.json_mode:
            held = "".join(self._held)
            events += self.stream.text(extract_json(held) or held)
        if self.stops.matched is not None:
            stop_reason = "stop_sequence"
        elif self.stream.has_tool_use:
            stop_reason = "tool_use"
        elif reason in ("length", "timeout"):
            stop_reason = "max_tokens"
        else:
            stop_reason = "end_turn"
        return events + self.stream.finish(stop_reason, output_tokens, self.stops.matched)
