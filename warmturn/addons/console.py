"""Console: one line per API flow on mitmdump's console, when it ends.

    warmturn: messages 200 end_turn · TTFT 0.79 s · 381 prompt tokens, 96% from cache · queue 3 ms · 7 out ·
              stripped system block 0 (57 chars)     (one line)
    warmturn: messages 400 · prompt is too long: 13940 tokens > 8191 maximum (the served model … has a 8192-token context; fix: …)

Refusals and errors are logged as warnings, with the backend's own message (which names the served
model, its context, the request's size and the fix for an over-context prompt). Reads the flow's
:class:`~addons.state.FlowState`; standard library and mitmproxy only.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import http

from warmturn import rules

from .state import FlowState

logger = logging.getLogger(__name__)


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int] | None:
    """(prompt tokens, of which read from the cache), from Anthropic's usage accounting."""
    if not usage:
        return None
    parts = [usage.get(k) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")]
    if not any(isinstance(p, int) for p in parts):
        return None
    prompt = sum(p for p in parts if isinstance(p, int))
    read = usage.get("cache_read_input_tokens")
    return prompt, read if isinstance(read, int) else 0


def summary(state: FlowState, status: int | None) -> str:
    """The console line of a finished flow (pure)."""
    what = state.kind + (f" ({state.side})" if getattr(state, "side", None) else "")
    head = f"warmturn: {what} {status if status is not None else '-'}"
    if state.error:
        return f"{head} · {state.error.get('message') or state.error.get('type')}"
    parts = [head + (f" {state.stop_reason}" if state.stop_reason else "")]
    t = state.t
    if t.first_content is not None and t.request is not None:
        parts.append(f"TTFT {t.first_content - t.request:.2f} s")
    tokens = _tokens(state.usage)
    if tokens and state.kind == "messages":
        prompt, read = tokens
        parts.append(f"{prompt} prompt tokens, {100 * read // prompt if prompt else 0}% from cache")
    elif tokens and state.kind == "count_tokens":
        parts.append(f"{tokens[0]} tokens")
    if state.queue_ms is not None:
        parts.append(f"queue {state.queue_ms:.0f} ms")
    if state.usage and isinstance(state.usage.get("output_tokens"), int) and state.kind == "messages":
        parts.append(f"{state.usage['output_tokens']} out")
    removed = [e for e in state.stripped if e.kind != "rewrite"]
    if removed:
        parts.append("stripped " + rules.describe(removed))
    if len(removed) < len(state.stripped):
        parts.append("model name canonicalized")
    return " · ".join(parts)


class Console:
    def response(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    @staticmethod
    def _log(flow: http.HTTPFlow) -> None:
        state = FlowState.of(flow)
        if state is None or not flow.live:
            return
        status = flow.response.status_code if flow.response is not None else None
        line = summary(state, status)
        if state.error or (status or 0) >= 400:
            logger.warning(line)
        else:
            logger.info(line)
