"""mitmweb/mitmproxy contentview "warmturn": Messages requests and (streamed) responses, readable.

Both views open with what warmturn measured for the flow (TTFT, the backend's queue wait and prefill,
prompt and output tokens, cache read/creation and the hit ratio), then the content. Lines are wrapped at
:data:`WIDTH` columns (mitmweb shows a view's text without wrapping), continuation lines indented.
"""

from __future__ import annotations

import json
import textwrap

from mitmproxy import contentviews, http

from warmturn import rules
from warmturn.protocol import MessageFold, request_kind
from warmturn.rules import Stripped

from .state import FlowState

WIDTH = 80  # fits mitmweb's flow-detail pane in a 1400-pixel-wide window


def _short(text: str, n: int = 400) -> str:
    """``text`` on one line (newlines shown as \\n), cut after ``n`` characters; the length given is the
    text's own, as in the block headers (not the escaped one)."""
    size = len(text)
    head = text[:n].replace("\n", "\\n")
    return head if size <= n else head + f"… ({size} chars)"


def wrap(text: str, width: int = WIDTH) -> str:
    """Every line longer than ``width`` broken into lines of at most ``width`` characters, the continuation
    lines indented by four spaces (nothing is dropped but the spaces a break falls on)."""
    out: list[str] = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
        else:
            out.extend(textwrap.wrap(line, width, subsequent_indent="    ", break_long_words=True,
                                     break_on_hyphens=False, replace_whitespace=False, drop_whitespace=True))
    return "\n".join(out)


def _seconds(a: float | None, b: float | None) -> str:
    return f"{b - a:.2f} s" if a is not None and b is not None else "-"


def render_measurements(state: FlowState | None) -> str:
    """What warmturn measured for the flow, for the top of both views ("" for a flow it did not handle)."""
    if state is None:
        return ""
    t = state.t
    side = f" ({state.side} request, not a turn)" if state.side else ""
    lines = [f"warmturn: {state.kind}{side}  TTFT {_seconds(t.request, t.first_content)}  "
             f"total {_seconds(t.request, t.end)}  queue wait "
             + (f"{state.queue_ms:.0f} ms" if state.queue_ms is not None else "-")
             + ("" if state.prefill_ms is None else f"  prefill {state.prefill_ms:.0f} ms")]
    u = state.usage or {}
    read, created, fresh = (u.get(k) for k in ("cache_read_input_tokens", "cache_creation_input_tokens", "input_tokens"))
    if any(isinstance(x, int) for x in (read, created, fresh)):
        prompt = sum(x for x in (read, created, fresh) if isinstance(x, int))
        hit = f"{100 * (read or 0) // prompt}%" if prompt else "-"  # rounded down, as on the console
        lines.append(f"tokens: prompt {prompt} (cache read {read or 0}, cache creation {created or 0}, uncached "
                     f"{fresh or 0}; hit {hit})  output {u.get('output_tokens', '-')}")
    removed = [e for e in state.stripped if e.kind != "rewrite"]
    renamed = len(state.stripped) - len(removed)
    if state.stripped:
        lines.append("normalized: " + ", ".join(([rules.describe(removed)] if removed else [])
                                              + ([f"model name canonicalized ({renamed})"] if renamed else [])))
    if state.error:
        lines.append(f"error: {state.error.get('type')}: {state.error.get('message')}")
    return "\n".join(lines) + "\n\n"


def _system_lines(system: object) -> list[str]:
    if isinstance(system, str):
        return [f"system: {_short(system)}"]
    if not isinstance(system, list):
        return []
    lines = []
    for i, b in enumerate(system):
        cc = " [cache_control]" if isinstance(b, dict) and b.get("cache_control") else ""
        text = b.get("text", "") if isinstance(b, dict) else str(b)
        lines.append(f"system[{i}]{cc} ({len(text)} chars): {_short(text)}")
    return lines


def _block_detail(b: object) -> tuple[object, str]:
    """(kind, one-line detail) of one message content block."""
    if not isinstance(b, dict):
        return "?", ""
    kind = b.get("type")
    if kind == "text":
        return kind, _short(b.get("text", ""))
    if kind == "tool_use":
        return kind, f"{b.get('name')} {_short(json.dumps(b.get('input'), ensure_ascii=False), 200)}"
    if kind == "tool_result":
        return kind, f"{b.get('tool_use_id')} {_short(json.dumps(b.get('content'), ensure_ascii=False), 200)}"
    if kind == "thinking":
        return kind, _short(b.get("thinking", ""), 200)
    return kind, ""


def _message_lines(i: int, m: object) -> list[str]:
    content = m.get("content") if isinstance(m, dict) else m
    role = m.get("role") if isinstance(m, dict) else "?"
    if isinstance(content, str):
        return [f"[{i}] {role}: {_short(content)}"]
    lines = []
    for b in content or []:
        kind, detail = _block_detail(b)
        lines.append(f"[{i}] {role} {kind}: {detail}")
    return lines


def render_request(body: dict, stripped: list[Stripped]) -> str:
    lines = [f"model: {body.get('model')}  stream: {body.get('stream', False)}  max_tokens: {body.get('max_tokens')}"]
    params = {k: v for k, v in body.items() if k not in ("model", "stream", "max_tokens", "system", "tools", "messages")}
    for k, v in params.items():
        lines.append(f"{k}: {_short(json.dumps(v, ensure_ascii=False), 200)}")
    lines.append("")
    for e in stripped:
        if e.kind == "rewrite":  # canonicalized, not removed: the description says it all
            lines.append(f"REWRITTEN {e.describe()}")
        else:
            lines.append(f"STRIPPED {e.describe()}: {e.preview(200)}")
    lines += _system_lines(body.get("system"))
    tools = body.get("tools") or []
    if tools:
        lines.append("")
        lines.append(f"tools ({len(tools)}, {len(json.dumps(tools))} chars JSON):")
        for t in tools:
            lines.append(f"  {t.get('name', t.get('type'))}: {len(json.dumps(t))} chars")
    lines.append("")
    for i, m in enumerate(body.get("messages") or []):
        lines += _message_lines(i, m)
    return "\n".join(lines)


def render_fold(fold: MessageFold) -> str:
    lines = [f"model: {fold.model}  stop_reason: {fold.stop_reason}", f"usage: {json.dumps(fold.usage)}"]
    if fold.error:
        lines.append(f"error: {fold.error['type']}: {fold.error['message']}")
    for i, b in enumerate(fold.content):
        kind = b.get("type")
        if kind == "text":
            lines.append(f"[{i}] text:\n{b.get('text', '')}")
        elif kind == "tool_use":
            lines.append(f"[{i}] tool_use {b.get('name')} ({b.get('id')}): "
                         f"{json.dumps(b.get('input', b.get('input_raw')), ensure_ascii=False)}")
        elif kind == "thinking":
            lines.append(f"[{i}] thinking:\n{b.get('thinking', '')}")
        else:
            lines.append(f"[{i}] {kind}")
    return "\n".join(lines)


class AnthropicContentview(contentviews.Contentview):
    name = "warmturn"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        msg = metadata.http_message
        state = FlowState.of(metadata.flow) if isinstance(metadata.flow, http.HTTPFlow) else None
        if isinstance(msg, http.Request):
            body = json.loads(data)
            if not isinstance(body, dict):
                raise ValueError("not a Messages request")
            text = render_request(body, state.stripped if state is not None else [])
        else:
            text = render_fold(MessageFold().add_bytes(data))
        return wrap(render_measurements(state) + text)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        f = metadata.flow
        if not isinstance(f, http.HTTPFlow) or not data:
            return -1
        return 2 if request_kind(f.request.path) in ("messages", "count_tokens") else -1


_registered = False


def register_contentview() -> None:
    """Register the view once per process (script reloads would otherwise duplicate it)."""
    global _registered
    if not _registered:
        contentviews.add(AnthropicContentview())
        _registered = True
