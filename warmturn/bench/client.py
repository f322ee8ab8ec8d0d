"""The bench's client: send one Messages request, stream the SSE answer, time it.

Timing is taken on the client side (what a user waits for): TTFB at the first body byte,
TTFT at the first `content_block_delta`. The stream is decoded and folded by the shared
protocol module (usage from `message_start` merged with `message_delta`, as Anthropic's
accounting defines it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from warmturn.protocol import MessageFold, SSEDecoder


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
    request_id: str | None = None  # the server's `request-id` response header, when it sends one

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


def send(client: httpx.Client, base_url: str, body: dict, headers: dict[str, str], timeout: float) -> Result:
    """POST body to base_url/v1/messages?beta=true and stream the answer."""
    result = Result()
    decoder, fold = SSEDecoder(), MessageFold()
    t0 = time.perf_counter()
    ms = lambda: (time.perf_counter() - t0) * 1000.0  # noqa: E731
    try:
        with client.stream("POST", f"{base_url}/v1/messages?beta=true", json=body, headers=headers,
                           timeout=httpx.Timeout(timeout, connect=10.0)) as resp:
            result.status = resp.status_code
            result.request_id = resp.headers.get("request-id")
            if resp.status_code != 200:
                raw = resp.read()
                result.ttfb_ms = ms()
                try:
                    err = json.loads(raw).get("error") or {}
                    result.error = f"HTTP {resp.status_code} {err.get('type')}: {err.get('message')}"
                except ValueError:
                    result.error = f"HTTP {resp.status_code}: {raw[:200]!r}"
                return result
            for chunk in resp.iter_bytes():
                if result.ttfb_ms is None and chunk:
                    result.ttfb_ms = ms()
                for ev in decoder.feed(chunk):
                    if fold.add(ev):
                        result.ttft_ms = ms()
            for ev in decoder.flush():
                fold.add(ev)
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.usage, result.stop_reason, result.text = fold.usage, fold.stop_reason, fold.text
    if fold.error and result.error is None:
        result.error = f"{fold.error['type']}: {fold.error['message']}"
    result.total_ms = ms()
    if result.ttft_ms is None and result.error is None:
        result.error = "no content_block_delta in the stream"
    return result
