"""mitmweb/mitmproxy contentview "Anthropic": Messages requests and (streamed) responses, readable."""

from __future__ import annotations

import json

from mitmproxy import contentviews, http

from warmturn.protocol import MessageFold, request_kind
from warmturn.rules import Stripped

from .state import FlowState


def _short(text: str, n: int = 400) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[:n] + f"… ({len(text)} chars)"


def render_request(body: dict, stripped: list[Stripped]) -> str:
    lines = [f"model: {body.get('model')}  stream: {body.get('stream', False)}  max_tokens: {body.get('max_tokens')}"]
    params = {k: v for k, v in body.items() if k not in ("model", "stream", "max_tokens", "system", "tools", "messages")}
    for k, v in params.items():
        lines.append(f"{k}: {_short(json.dumps(v, ensure_ascii=False), 200)}")
    lines.append("")
    for e in stripped:
        lines.append(f"STRIPPED {e.describe()}: {e.preview(200)}")
    system = body.get("system")
    if isinstance(system, str):
        lines.append(f"system: {_short(system)}")
    elif isinstance(system, list):
        for i, b in enumerate(system):
            cc = " [cache_control]" if isinstance(b, dict) and b.get("cache_control") else ""
            text = b.get("text", "") if isinstance(b, dict) else str(b)
            lines.append(f"system[{i}]{cc} ({len(text)} chars): {_short(text)}")
    tools = body.get("tools") or []
    if tools:
        lines.append("")
        lines.append(f"tools ({len(tools)}, {len(json.dumps(tools))} chars JSON):")
        for t in tools:
            lines.append(f"  {t.get('name', t.get('type'))}: {len(json.dumps(t))} chars")
    lines.append("")
    for i, m in enumerate(body.get("messages") or []):
        content = m.get("content") if isinstance(m, dict) else m
        role = m.get("role") if isinstance(m, dict) else "?"
        if isinstance(content, str):
            lines.append(f"[{i}] {role}: {_short(content)}")
            continue
        for b in content or []:
            kind = b.get("type") if isinstance(b, dict) else "?"
            if kind == "text":
                detail = _short(b.get("text", ""))
            elif kind == "tool_use":
                detail = f"{b.get('name')} {_short(json.dumps(b.get('input'), ensure_ascii=False), 200)}"
            elif kind == "tool_result":
                detail = f"{b.get('tool_use_id')} {_short(json.dumps(b.get('content'), ensure_ascii=False), 200)}"
            elif kind == "thinking":
                detail = _short(b.get("thinking", ""), 200)
            else:
                detail = ""
            lines.append(f"[{i}] {role} {kind}: {detail}")
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
    name = "Anthropic"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        msg = metadata.http_message
        if isinstance(msg, http.Request):
            body = json.loads(data)
            state = FlowState.of(metadata.flow) if isinstance(metadata.flow, http.HTTPFlow) else None
            stripped = state.stripped if state is not None else []
            if not isinstance(body, dict):
                raise ValueError("not a Messages request")
            return render_request(body, stripped)
        return render_fold(MessageFold().add_bytes(data))

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
