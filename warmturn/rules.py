"""Normalization rules: what makes a Claude Code request cache-hostile, removing it, and undoing that.

Standard library only: the addon applies the rules, the capture records what they removed, the
contentview shows it, and the analysis restores the client's original request and checks the
patterns it suggests, all through the types here:

- :class:`Rules` (compiled from the addon's ``volatile_*`` options) *applies* itself to a body,
  a text or a header list and returns what it removed;
- each removal is a :class:`Stripped` entry (:class:`StrippedBlock`, :class:`StrippedFragment`,
  :class:`StrippedHeader`): it *describes* itself, *restores* itself into a body or headers,
  redacts itself for a capture, and round-trips through the capture's JSON
  (:meth:`Stripped.to_json`, :func:`stripped_from_json`; docs/capture-format.md, ``stripped``);
- :func:`restore` undoes a list of entries (in reverse order) to give back the original request.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from . import model_identity
from .protocol import REDACTED, is_secret_name

# A system text block matching one of these (re.search; ^ is the block's start) is dropped whole.
DEFAULT_VOLATILE_PATTERNS: tuple[str, ...] = (r"^x-anthropic-billing-header:",)
# Text matching one of these (re.MULTILINE) is cut out of the system blocks that stay (and out of a string `system`).
DEFAULT_VOLATILE_FRAGMENTS: tuple[str, ...] = (r"x-anthropic-billing-header:[^\n]*\n?",)
# Request headers dropped before forwarding (case-insensitive names).
DEFAULT_VOLATILE_HEADERS: tuple[str, ...] = (
    "x-anthropic-billing-header",
    "x-stainless-retry-count",
    "x-client-request-id",
)


def _preview(text: str, n: int) -> str:
    """``text`` on one line, cut after ``n`` characters; the length given is the text's own (as in
    :meth:`Stripped.describe`), not that of its escaped form."""
    head = text[:n].replace("\n", "\\n")
    return head if len(text) <= n else head + f"… ({len(text)} chars)"


# --------------------------------------------------------------------------- paths

_PATH_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def parse_path(path: str) -> list[str | int]:
    """``system[2].text`` -> ``["system", 2, "text"]``; raises ValueError on anything else."""
    out: list[str | int] = []
    pos = 0
    for m in _PATH_TOKEN.finditer(path):
        if path[pos:m.start()] not in ("", "."):
            raise ValueError(f"bad path {path!r}")
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if pos != len(path) or not out:
        raise ValueError(f"bad path {path!r}")
    return out


# --------------------------------------------------------------------------- stripped entries


def _splice(body: dict[str, Any], path: str, offset: int, removed: int, text: str) -> None:
    """Put `text` back into the string at `path` in `body`, at `offset`, in place of the
    `removed` characters there (what an entry's undo does)."""
    keys = parse_path(path)
    parent: Any = body
    for k in keys[:-1]:
        parent = parent[k]
    old = parent[keys[-1]]
    parent[keys[-1]] = old[:offset] + text + old[offset + removed:]


@dataclass(frozen=True)
class Stripped:
    """One thing normalization removed (base of the three kinds)."""

    kind: ClassVar[str] = ""
    pattern: str

    @property
    def label(self) -> str:
        """``kind: pattern``: which rule fired, for counting."""
        return f"{self.kind}: {self.pattern}"

    def to_json(self) -> dict[str, Any]:
        """The capture's JSON shape (docs/capture-format.md)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short human description (flow comments, logs)."""
        raise NotImplementedError

    def preview(self, n: int = 200) -> str:
        """The removed content, shortened to ``n`` characters."""
        raise NotImplementedError

    def undo(self, body: Any, headers: dict[str, Any]) -> None:
        """Put this entry back into ``body`` / ``headers`` (lower-case names), in place."""
        raise NotImplementedError

    def redacted(self) -> Stripped:
        """This entry as it may be written to a capture (credentials hidden)."""
        return self


@dataclass(frozen=True)
class StrippedBlock(Stripped):
    """A whole ``system`` block, removed from position ``index`` of the blocks kept so far."""

    kind: ClassVar[str] = "system_block"
    index: int = 0
    block: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "block": self.block, "pattern": self.pattern}

    def _text(self) -> str:
        return self.block.get("text", "") if isinstance(self.block, dict) else str(self.block)

    def describe(self) -> str:
        return f"system block {self.index} ({len(self._text())} chars)"

    def preview(self, n: int = 200) -> str:
        return _preview(self._text(), n)

    def undo(self, body: Any, headers: dict[str, Any]) -> None:
        if not isinstance(body, dict):
            return
        system = body.get("system")
        system = [{"type": "text", "text": system}] if isinstance(system, str) else list(system or [])
        system.insert(self.index, self.block)
        body["system"] = system


@dataclass(frozen=True)
class StrippedFragment(Stripped):
    """Text cut out of the string at ``path`` (``system`` or ``system[i].text``) at ``offset``."""

    kind: ClassVar[str] = "fragment"
    path: str = "system"
    offset: int = 0
    text: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "offset": self.offset, "text": self.text,
                "pattern": self.pattern}

    def describe(self) -> str:
        return f"{len(self.text)} chars from {self.path}"

    def preview(self, n: int = 200) -> str:
        return _preview(self.text, n)

    def undo(self, body: Any, headers: dict[str, Any]) -> None:
        if not isinstance(body, dict):
            return
        _splice(body, self.path, self.offset, 0, self.text)


@dataclass(frozen=True)
class StrippedHeader(Stripped):
    """A request header dropped before forwarding."""

    kind: ClassVar[str] = "header"
    name: str = ""
    value: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "value": self.value, "pattern": self.pattern}

    def describe(self) -> str:
        return f"header {self.name}"

    def preview(self, n: int = 200) -> str:
        return self.name

    def undo(self, body: Any, headers: dict[str, Any]) -> None:
        headers[self.name.lower()] = self.value

    def redacted(self) -> Stripped:
        return replace(self, value=REDACTED) if is_secret_name(self.name) else self


@dataclass(frozen=True)
class StrippedRewrite(Stripped):
    """Text at ``path`` replaced by a canonical form: ``replacement`` now sits at ``offset`` where
    ``text`` was (the model identity, :mod:`warmturn.model_identity`). Nothing is deleted."""

    kind: ClassVar[str] = "rewrite"
    path: str = "system"
    offset: int = 0
    text: str = ""
    replacement: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "offset": self.offset, "text": self.text,
                "replacement": self.replacement, "pattern": self.pattern}

    def describe(self) -> str:
        return f"{self.text!r} -> {self.replacement!r} in {self.path}"

    def preview(self, n: int = 200) -> str:
        return _preview(f"{self.text} -> {self.replacement}", n)

    def undo(self, body: Any, headers: dict[str, Any]) -> None:
        if not isinstance(body, dict):
            return
        _splice(body, self.path, self.offset, len(self.replacement), self.text)


STRIPPED_KINDS: Mapping[str, type[Stripped]] = {
    k.kind: k for k in (StrippedBlock, StrippedFragment, StrippedHeader, StrippedRewrite)
}


def stripped_from_json(entry: Mapping[str, Any] | Stripped) -> Stripped:
    """A capture's ``stripped`` entry as its type (an entry already typed is returned as is).

    Raises ValueError for an unknown kind or malformed fields.
    """
    if isinstance(entry, Stripped):
        return entry
    if not isinstance(entry, Mapping):
        raise ValueError(f"stripped entry is not an object: {entry!r}")
    kind = entry.get("kind")
    pattern = str(entry.get("pattern", ""))
    try:
        if kind == "system_block":
            return StrippedBlock(pattern, int(entry.get("index", 0)), entry.get("block"))
        if kind == "fragment":
            return StrippedFragment(pattern, str(entry.get("path", "")), int(entry.get("offset", 0)),
                                    str(entry.get("text", "")))
        if kind == "header":
            return StrippedHeader(pattern, str(entry.get("name", "")), str(entry.get("value", "")))
        if kind == "rewrite":
            return StrippedRewrite(pattern, str(entry.get("path", "")), int(entry.get("offset", 0)),
                                   str(entry.get("text", "")), str(entry.get("replacement", "")))
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed {kind} entry: {e}") from e
    raise ValueError(f"unknown stripped kind {kind!r}")


def restore(body: Any, headers: Mapping[str, Any] | None,
            stripped: Iterable[Mapping[str, Any] | Stripped]) -> tuple[Any, dict[str, Any]]:
    """The client's original body and headers: the forwarded ones with ``stripped`` put back.

    Entries are undone in reverse order (docs/capture-format.md). Inputs are not modified;
    header names come back lower-case. With no body, only headers are restored.
    """
    body = copy.deepcopy(body)
    out_headers = {str(k).lower(): v for k, v in (headers or {}).items()}
    for entry in reversed([stripped_from_json(e) for e in stripped or []]):
        if body is None and not isinstance(entry, StrippedHeader):
            continue
        entry.undo(body, out_headers)
    return body, out_headers


def describe(stripped: Sequence[Stripped]) -> str:
    """One line for a list of removals: ``system block 0 (88 chars), header x-stainless-retry-count``."""
    return ", ".join(e.describe() for e in stripped)


# --------------------------------------------------------------------------- rules


def compile_patterns(patterns: Iterable[str], what: str, flags: int = 0) -> tuple[re.Pattern[str], ...]:
    """Compile regexes (empty ones skipped); raise ValueError naming the bad one."""
    out = []
    for p in patterns:
        if not p:
            continue
        try:
            out.append(re.compile(p, flags))
        except re.error as e:
            raise ValueError(f"invalid regex in {what}: {p!r}: {e}") from e
    return tuple(out)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


class _Canonicalizer:
    """Canonicalizes the model's name and id in one body's system text, tool descriptions and role=system
    messages, keeping every rewrite made (with its path in the body)."""

    def __init__(self) -> None:
        self.done: list[StrippedRewrite] = []

    def text(self, text: str, path: str) -> str:
        new, changes = model_identity.rewrites(text)
        self.done.extend(StrippedRewrite(c.pattern, path, c.start, c.old, c.new) for c in changes)
        return new

    def content(self, content: Any, path: str) -> Any:
        """A string, or a list of blocks whose text blocks are rewritten; anything else as it is."""
        if isinstance(content, str):
            return self.text(content, path)
        if not isinstance(content, list):
            return content
        out = []
        for j, b in enumerate(content):
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
                new = self.text(b["text"], f"{path}[{j}].text")
                b = b if new == b["text"] else {**b, "text": new}
            out.append(b)
        return out

    def system(self, system: Any) -> Any:
        return self.content(system, "system")

    def tools(self, tools: Any) -> Any:
        if not isinstance(tools, list):
            return tools
        out = []
        for i, tool in enumerate(tools):
            if isinstance(tool, dict) and isinstance(tool.get("description"), str):
                new = self.text(tool["description"], f"tools[{i}].description")
                tool = tool if new == tool["description"] else {**tool, "description": new}
            out.append(tool)
        return out

    def messages(self, messages: Any) -> Any:
        if not isinstance(messages, list):
            return messages
        out = []
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") == "system":
                content = m.get("content")
                new = self.content(content, f"messages[{i}].content")
                m = m if new == content else {**m, "content": new}
            out.append(m)
        return out


@dataclass(frozen=True)
class Rules:
    """Compiled normalization rules: system blocks to drop, fragments to cut, headers to drop."""

    block_patterns: tuple[re.Pattern[str], ...] = ()
    fragment_patterns: tuple[re.Pattern[str], ...] = ()
    headers: frozenset[str] = frozenset()
    identity: bool = False  # canonicalize the model's name and id (warmturn.model_identity)

    @classmethod
    def make(cls, patterns: Sequence[str] = DEFAULT_VOLATILE_PATTERNS,
             fragments: Sequence[str] = DEFAULT_VOLATILE_FRAGMENTS,
             headers: Sequence[str] = DEFAULT_VOLATILE_HEADERS, identity: bool = True) -> Rules:
        """Rules from the addon's option values; raises ValueError on a bad regex or header name."""
        names = set()
        for h in headers:
            h = h.strip().lower()
            if not h:
                continue
            if not _HEADER_NAME.fullmatch(h):
                raise ValueError(f"invalid header name in volatile_headers: {h!r}")
            names.add(h)
        return cls(compile_patterns(patterns, "volatile_patterns"),
                   compile_patterns(fragments, "volatile_fragments", re.MULTILINE), frozenset(names), identity)

    def describe(self) -> str:
        """What these rules remove, in words (logs, the options' effect)."""
        parts = [f"system blocks matching {p.pattern!r}" for p in self.block_patterns]
        parts += [f"text matching {p.pattern!r}" for p in self.fragment_patterns]
        parts += [f"header {h}" for h in sorted(self.headers)]
        out = "strips " + ("; ".join(parts) if parts else "nothing")
        return out + ("; canonicalizes the model's name and id" if self.identity else "")

    def strip_text(self, text: str, path: str = "system") -> tuple[str, list[StrippedFragment]]:
        """``text`` with every fragment pattern's matches cut out (patterns in order), and the cuts."""
        stripped: list[StrippedFragment] = []
        for pat in self.fragment_patterns:
            pieces: list[str] = []
            removed = last = 0
            for m in pat.finditer(text):
                if m.end() == m.start():
                    continue
                pieces.append(text[last:m.start()])
                stripped.append(StrippedFragment(pat.pattern, path, m.start() - removed, m.group(0)))
                removed += m.end() - m.start()
                last = m.end()
            if pieces:
                pieces.append(text[last:])
                text = "".join(pieces)
        return text, stripped

    def _block_rule(self, block: Any) -> re.Pattern[str] | None:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            return None
        return next((p for p in self.block_patterns if p.search(block["text"])), None)

    def apply(self, body: Any) -> tuple[Any, list[Stripped]]:
        """Remove volatile system content from a parsed Messages request body, then (``identity``)
        canonicalize the model's name and id in system text, tool descriptions and role=system messages.

        Returns ``(new_body, stripped)``: ``new_body`` is ``body`` itself when nothing matched,
        otherwise a shallow copy with new ``system`` / ``tools`` / ``messages`` (only the containers that
        changed are copied). Nothing else is touched; every change is in ``stripped``.
        """
        body, stripped = self._strip_system(body)
        if self.identity and isinstance(body, dict):
            body, rewrites = self._canonical_identity(body)
            stripped.extend(rewrites)
        return body, stripped

    @staticmethod
    def _canonical_identity(body: dict[str, Any]) -> tuple[dict[str, Any], list[StrippedRewrite]]:
        canon = _Canonicalizer()
        out = body
        for key, rewrite in (("system", canon.system), ("tools", canon.tools), ("messages", canon.messages)):
            value = body.get(key)
            new = rewrite(value)
            if new != value:
                out = {**out, key: new}
        return out, canon.done

    def _strip_system(self, body: Any) -> tuple[Any, list[Stripped]]:
        stripped: list[Stripped] = []
        if not isinstance(body, dict) or "system" not in body:
            return body, stripped
        system = body["system"]
        if isinstance(system, str):
            new_system: Any
            new_system, cuts = self.strip_text(system, "system")
            stripped.extend(cuts)
        elif isinstance(system, list):
            kept: list[Any] = []
            for block in system:
                rule = self._block_rule(block)
                if rule is not None:
                    stripped.append(StrippedBlock(rule.pattern, len(kept), block))
                else:
                    kept.append(block)
            new_system = []
            for i, block in enumerate(kept):
                text = block.get("text") if isinstance(block, dict) else None
                if isinstance(text, str) and self.fragment_patterns:
                    new_text, cuts = self.strip_text(text, f"system[{i}].text")
                    if cuts:
                        stripped.extend(cuts)
                        block = {**block, "text": new_text}
                new_system.append(block)
        else:
            return body, stripped
        if not stripped:
            return body, stripped
        return {**body, "system": new_system}, stripped

    def apply_headers(self, headers: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[StrippedHeader]]:
        """Split header fields into (kept, stripped entries)."""
        kept: list[tuple[str, str]] = []
        stripped: list[StrippedHeader] = []
        for name, value in headers:
            if name.lower() in self.headers:
                stripped.append(StrippedHeader(name.lower(), name, value))
            else:
                kept.append((name, value))
        return kept, stripped


# --------------------------------------------------------------------------- forwarded body helpers


def encode_body(body: Any) -> bytes:
    """Serialize a re-written body compactly (key order and all values preserved)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _sorted_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prefix_stats(body: Any) -> tuple[str | None, int | None]:
    """(prefix_hash, prefix_chars) of a forwarded Messages body: see docs/capture-format.md."""
    if not isinstance(body, dict):
        return None, None
    system = body.get("system")
    tools = body.get("tools")
    digest = hashlib.sha256(_sorted_json({"system": system, "tools": tools}).encode("utf-8")).hexdigest()[:16]
    chars = 0
    if isinstance(system, str):
        chars += len(system)
    elif isinstance(system, list):
        chars += sum(len(b.get("text", "")) for b in system if isinstance(b, dict) and isinstance(b.get("text"), str))
    if tools is not None:
        chars += len(_sorted_json(tools))
    return digest, chars
