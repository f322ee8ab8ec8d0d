"""Normalization rules: what makes a Claude Code request cache-hostile, and removing it.

Pure functions over parsed JSON and header lists; nothing here knows about mitmproxy.
Every removal is recorded (see docs/capture-format.md, `stripped`) so the original
request can be restored exactly from the forwarded one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

BILLING_PREFIX = "x-anthropic-billing-header:"

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


@dataclass(frozen=True)
class Rules:
    """Compiled normalization rules."""

    block_patterns: tuple[re.Pattern[str], ...] = ()
    fragment_patterns: tuple[re.Pattern[str], ...] = ()
    headers: frozenset[str] = frozenset()


def compile_patterns(patterns: Iterable[str], what: str, flags: int = 0) -> tuple[re.Pattern[str], ...]:
    """Compile regexes; raise ValueError naming the bad one."""
    out = []
    for p in patterns:
        if not p:
            continue
        try:
            out.append(re.compile(p, flags))
        except re.error as e:
            raise ValueError(f"invalid regex in {what}: {p!r}: {e}") from e
    return tuple(out)


def make_rules(
    patterns: Sequence[str] = DEFAULT_VOLATILE_PATTERNS,
    fragments: Sequence[str] = DEFAULT_VOLATILE_FRAGMENTS,
    headers: Sequence[str] = DEFAULT_VOLATILE_HEADERS,
) -> Rules:
    """Build Rules from option values (raises ValueError on a bad regex or header name)."""
    names = set()
    for h in headers:
        h = h.strip().lower()
        if not h:
            continue
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", h):
            raise ValueError(f"invalid header name in volatile_headers: {h!r}")
        names.add(h)
    return Rules(
        compile_patterns(patterns, "volatile_patterns"),
        compile_patterns(fragments, "volatile_fragments", re.MULTILINE),
        frozenset(names),
    )


@dataclass
class BillingInfo:
    """What the billing block (if any) told us about the request."""

    present: bool = False
    is_subagent: bool = False
    fields: dict[str, str] = field(default_factory=dict)


def parse_billing(text: str) -> BillingInfo:
    """Parse `x-anthropic-billing-header: k=v; k=v;` (tolerant of any field set)."""
    idx = text.find(BILLING_PREFIX)
    if idx < 0:
        return BillingInfo()
    line = text[idx + len(BILLING_PREFIX):].split("\n", 1)[0]
    fields = {}
    for part in line.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k:
            fields[k] = v
    return BillingInfo(True, fields.get("cc_is_subagent") == "true", fields)


def find_billing(body: Any) -> BillingInfo:
    """The billing info of an Anthropic request body (system string or blocks)."""
    if not isinstance(body, dict):
        return BillingInfo()
    system = body.get("system")
    if isinstance(system, str):
        return parse_billing(system)
    if isinstance(system, list):
        for block in system:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                info = parse_billing(block["text"])
                if info.present:
                    return info
    return BillingInfo()


def _cut_fragments(text: str, path: str, rules: Rules, stripped: list[dict]) -> str:
    for pat in rules.fragment_patterns:
        pieces = []
        removed = 0
        last = 0
        for m in pat.finditer(text):
            if m.end() == m.start():
                continue
            pieces.append(text[last:m.start()])
            stripped.append({
                "kind": "fragment",
                "path": path,
                "offset": m.start() - removed,
                "text": m.group(0),
                "pattern": pat.pattern,
            })
            removed += m.end() - m.start()
            last = m.end()
        if pieces:
            pieces.append(text[last:])
            text = "".join(pieces)
    return text


def strip_body(body: Any, rules: Rules) -> tuple[Any, list[dict]]:
    """Remove volatile system content from a parsed Messages request body.

    Returns (new_body, stripped). `new_body` is `body` itself when nothing matched; otherwise a
    shallow copy with a new `system`. Nothing besides `system` is ever touched.
    """
    stripped: list[dict] = []
    if not isinstance(body, dict) or "system" not in body:
        return body, stripped
    system = body["system"]
    if isinstance(system, str):
        new_system: Any = _cut_fragments(system, "system", rules, stripped)
    elif isinstance(system, list):
        kept: list[Any] = []
        for block in system:
            text = block.get("text") if isinstance(block, dict) else None
            if (
                isinstance(text, str)
                and block.get("type") == "text"
                and any(p.search(text) for p in rules.block_patterns)
            ):
                pat = next(p for p in rules.block_patterns if p.search(text))
                stripped.append({"kind": "system_block", "index": len(kept), "block": block, "pattern": pat.pattern})
                continue
            kept.append(block)
        new_system = []
        for i, block in enumerate(kept):
            text = block.get("text") if isinstance(block, dict) else None
            if isinstance(text, str) and rules.fragment_patterns:
                new_text = _cut_fragments(text, f"system[{i}].text", rules, stripped)
                if new_text != text:
                    block = {**block, "text": new_text}
            new_system.append(block)
    else:
        return body, stripped
    if not stripped:
        return body, stripped
    return {**body, "system": new_system}, stripped


def restore_body(body: Any, stripped: Sequence[dict]) -> Any:
    """Inverse of strip_body: put the stripped entries back (reverse order). Pure."""
    body = json.loads(json.dumps(body))
    for entry in reversed(stripped):
        kind = entry.get("kind")
        if kind == "system_block":
            body["system"].insert(entry["index"], entry["block"])
        elif kind == "fragment":
            path = entry["path"]
            if path == "system":
                s = body["system"]
                body["system"] = s[: entry["offset"]] + entry["text"] + s[entry["offset"]:]
            else:
                m = re.fullmatch(r"system\[(\d+)\]\.text", path)
                if not m:
                    raise ValueError(f"unknown fragment path {path!r}")
                blk = body["system"][int(m.group(1))]
                blk["text"] = blk["text"][: entry["offset"]] + entry["text"] + blk["text"][entry["offset"]:]
    return body


def strip_headers(headers: Sequence[tuple[str, str]], rules: Rules) -> tuple[list[tuple[str, str]], list[dict]]:
    """Split header fields into (kept, stripped entries)."""
    kept, stripped = [], []
    for name, value in headers:
        if name.lower() in rules.headers:
            stripped.append({"kind": "header", "name": name, "value": value, "pattern": name.lower()})
        else:
            kept.append((name, value))
    return kept, stripped


def encode_body(body: Any) -> bytes:
    """Serialize a re-written body compactly (key order and all values preserved)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prefix_stats(body: Any) -> tuple[str | None, int | None]:
    """(prefix_hash, prefix_chars) of a forwarded Messages body: see docs/capture-format.md."""
    import hashlib

    if not isinstance(body, dict):
        return None, None
    system = body.get("system")
    tools = body.get("tools")
    digest = hashlib.sha256(canonical({"system": system, "tools": tools}).encode("utf-8")).hexdigest()[:16]
    chars = 0
    if isinstance(system, str):
        chars += len(system)
    elif isinstance(system, list):
        chars += sum(len(b.get("text", "")) for b in system if isinstance(b, dict) and isinstance(b.get("text"), str))
    if tools is not None:
        chars += len(canonical(tools))
    return digest, chars
