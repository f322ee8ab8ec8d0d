"""The bench's client: send one Messages request, stream the SSE answer, time it.

Timing is taken on the client side (what a user waits for): TTFB at the first body byte,
TTFT at the first `content_block_delta`. Usage comes from `message_start` merged with
`message_delta`, as Anthropic's accounting defines it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    status: int | None = None
    ttfb_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    usage: dict = field(default_factory=dict)
    stop_reason: str | None = None
    text: str = ""
    error: str | None = None

    @property
    def prompt_tokens(self) -> int | None:
        """input + cache read + cache creation tokens, when the server reports them."""
        keys = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
        if not any(k in self.usage for k in keys):
            return None
        return sum(int(self.usage.get(k) or 0) for k in keys)

    @property
    def cached_tokens(self) -> int | None:
        v = self.usage.get("cache_read_input_tokens")
        return None if v is None else int(v)


def fold_event(result: Result, event: str, data: dict, now_ms: float) -> None:
    """Update `result` with one SSE event (pure apart from the result it mutates)."""
    kind = data.get("type", event)
    if kind == "message_start":
        result.usage.update({k: v for k, v in (data.get("message", {}).get("usage") or {}).items()
                             if v is not None})
    elif kind == "content_block_delta":
        if result.ttft_ms is None:
            result.ttft_ms = now_ms
        delta = data.get("delta") or {}
        result.text += delta.get("text") or delta.get("partial_json") or delta.get("thinking") or ""
    elif kind == "message_delta":
        result.usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
        result.stop_reason = (data.get("delta") or {}).get("stop_reason") or result.stop_reason
    elif kind == "error":
        err = data.get("error") or {}
        result.error = f"{err.get('type', 'error')}: {err.get('message', '')}"


def send(client: httpx.Client, base_url: str, body: dict, headers: dict[str, str], timeout: float) -> Result:
    """POST body to base_url/v1/messages?beta=true and stream the answer."""
    result = Result()
    t0 = time.perf_counter()
    ms = lambda: (time.perf_counter() - t0) * 1000.0  # noqa: E731
    try:
        with client.stream("POST", f"{base_url}/v1/messages?beta=true", json=body, headers=headers,
                           timeout=httpx.Timeout(timeout, connect=10.0)) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                raw = resp.read()
                result.ttfb_ms = ms()
                try:
                    err = json.loads(raw).get("error") or {}
                    result.error = f"HTTP {resp.status_code} {err.get('type')}: {err.get('message')}"
                except ValueError:
                    result.error = f"HTTP {resp.status_code}: {raw[:200]!r}"
                return result
            event, data_lines = "", []
            for line in resp.iter_lines():
                if result.ttfb_ms is None:
                    result.ttfb_ms = ms()
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data_lines.append(line[5:].lstrip())
                elif line == "" and data_lines:
                    try:
                        data = json.loads("\n".join(data_lines))
                    except ValueError:
                        data = {}
                    fold_event(result, event, data, ms())
                    event, data_lines = "", []
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.total_ms = ms()
    if result.ttft_ms is None and result.error is None:
        result.error = "no content_block_delta in the stream"
    return result
