"""Prompt divergence: where two requests' prompts stop sharing a prefix.

A prefix cache can reuse exactly the tokens two consecutive prompts share from the start.
This module renders an Anthropic request the way a backend lays it out — system text
blocks, then tools, then messages — as one string with a map of which part of the request
each character came from, and measures the shared prefix in characters and, given a
tokenizer, in tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from warmturn.prefix import common_prefix_len


@dataclass(frozen=True)
class Segment:
    """One rendered part of the prompt: ``where`` is a request path like ``system[0]``."""

    where: str
    start: int
    end: int


@dataclass(frozen=True)
class FlatPrompt:
    """A request flattened to text in model order, with the request part of every character."""

    text: str
    segments: tuple[Segment, ...]

    def where(self, pos: int) -> str:
        """The request part that character ``pos`` belongs to (``end`` past the last one)."""
        for s in self.segments:
            if s.start <= pos < s.end:
                return s.where
        return "end"


@dataclass(frozen=True)
class Divergence:
    """How much of ``b`` a prefix cache holding ``a`` can reuse, and where they part."""

    shared_chars: int
    chars_a: int
    chars_b: int
    where: str  # request part of ``b`` at the first differing character, or "identical"/"end"
    in_prefix: bool  # inside the cacheable prefix (system, tools) rather than messages
    snippet_a: str
    snippet_b: str
    shared_tokens: int | None = None
    tokens_a: int | None = None
    tokens_b: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _block_text(block) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return json.dumps(block, ensure_ascii=False)
    t = block.get("type")
    if t == "text":
        return str(block.get("text", ""))
    if t == "thinking":
        return str(block.get("thinking", ""))
    if t == "tool_use":
        return json.dumps({"name": block.get("name"), "input": block.get("input")}, ensure_ascii=False, sort_keys=True)
    if t == "tool_result":
        c = block.get("content")
        inner = c if isinstance(c, str) else "".join(_block_text(x) for x in (c or []))
        return f"[{block.get('tool_use_id', '')}] {inner}"
    return json.dumps(block, ensure_ascii=False, sort_keys=True)


def flatten_prompt(body: dict | None) -> FlatPrompt:
    """Flatten a Messages request body to text in model order: system blocks, tools, messages.

    An approximation of what a backend renders (no chat template), enough to locate the first
    difference between two requests.

    Tools are JSON in the order and key order the client sent (a reordering is a real change
    for a byte-level cache); a message whose content is a string and the same content as a
    one-block list render identically (servers render history deterministically).
    """
    parts: list[tuple[str, str]] = []
    body = body or {}
    system = body.get("system")
    if isinstance(system, str):
        parts.append(("system", system))
    elif isinstance(system, list):
        for i, block in enumerate(system):
            parts.append((f"system[{i}]", _block_text(block)))
    for i, tool in enumerate(body.get("tools") or []):
        parts.append((f"tools[{i}]", json.dumps(tool, ensure_ascii=False, separators=(",", ":"))))
    for i, msg in enumerate(body.get("messages") or []):
        if not isinstance(msg, dict):
            parts.append((f"messages[{i}]", str(msg)))
            continue
        c = msg.get("content")
        text = c if isinstance(c, str) else "".join(_block_text(b) for b in (c or []))
        parts.append((f"messages[{i}]", f"<{msg.get('role')}>{text}"))
    pieces, segs, pos = [], [], 0
    for where, text in parts:
        piece = text + "\n"
        segs.append(Segment(where, pos, pos + len(piece)))
        pieces.append(piece)
        pos += len(piece)
    return FlatPrompt("".join(pieces), tuple(segs))


class Tokenizer:
    """A thin wrapper over a ``tokenizers`` tokenizer.json (the model dir's own)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise ValueError(f"no tokenizer.json at {p} (give an mlx-lm/Hugging Face model directory)")
        self.name = str(p)
        self._tok = _Tok.from_file(str(file))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``default`` (or None): the default model's tokenizer; else a model dir or tokenizer.json."""
    if spec in (None, "", "default"):
        from warmturn.server.convert import resolve_model

        return Tokenizer(resolve_model(None))
    return Tokenizer(spec)


def _snippet(text: str, pos: int, width: int = 40) -> str:
    s = text[max(0, pos - width) : pos] + "⟦" + text[pos : pos + width]
    return s.replace("\n", "⏎")


def divergence(a: dict | None, b: dict | None, tokenizer: Tokenizer | None = None,
               _cache: dict | None = None) -> Divergence:
    """Shared prefix of ``a`` and ``b`` in model order, in characters (and tokens if given)."""
    ra, rb = flatten_prompt(a), flatten_prompt(b)
    n = common_prefix_len(ra.text, rb.text)
    if n == len(ra.text) == len(rb.text):  # noqa: SIM108 - a nested conditional expression reads worse
        where = "identical"
    else:
        where = rb.where(n) if n < len(rb.text) else ra.where(n)
    in_prefix = where.startswith(("system", "tools"))
    d = Divergence(n, len(ra.text), len(rb.text), where, in_prefix, _snippet(ra.text, n), _snippet(rb.text, n))
    if tokenizer is not None:
        cache = _cache if _cache is not None else {}
        ta = cache.get(ra.text) or cache.setdefault(ra.text, tokenizer.encode(ra.text))
        tb = cache.get(rb.text) or cache.setdefault(rb.text, tokenizer.encode(rb.text))
        d = Divergence(**{**d.__dict__, "shared_tokens": common_prefix_len(ta, tb),
                          "tokens_a": len(ta), "tokens_b": len(tb)})
    return d
