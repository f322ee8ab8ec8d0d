"""Tap: stream responses through unchanged while timing them and folding their events.

In ``responseheaders`` an SSE response gets a stream callable that stamps the first byte and
the first content delta, feeds the shared SSE decoder and :class:`~warmturn.protocol.MessageFold`,
and passes every chunk on (through the adapter's translator when the backend speaks another
API). Buffered responses are made Anthropic's by the adapter in ``response``. Either way the
fold's usage, stop reason and content end up in the flow's state for the capture.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable

from mitmproxy import http

from warmturn.protocol import SSEEvent

from .state import FlowState, Live

logger = logging.getLogger(__name__)

VIEW_COPY_LIMIT = 8 * 1024 * 1024  # the stream kept for mitmweb's view
# Where a backend reports its own timings (docs/server.md): state field -> response header of a
# buffered answer; a stream (whose headers go out before prefill ends) has them as the fields of the
# same names in its message_delta event's "warmturn" object.
BACKEND_TIMINGS = {"queue_ms": "x-warmturn-queue-ms", "prefill_ms": "x-warmturn-prefill-ms"}


def _set_timing(state: FlowState, field_name: str, raw: object) -> None:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if math.isfinite(value) and value >= 0:
        setattr(state, field_name, value)


def read_backend_timings(state: FlowState, headers: http.Headers) -> None:
    """The backend's queue wait and prefill time, from its response headers (absent or junk: None)."""
    for field_name, header in BACKEND_TIMINGS.items():
        if header in headers:
            _set_timing(state, field_name, headers[header])


def read_stream_timings(state: FlowState, ev: SSEEvent) -> None:
    """The same timings from a ``message_delta`` event's ``warmturn`` object (absent or junk: None)."""
    if ev.event != "message_delta" or '"warmturn"' not in ev.data:
        return
    data = ev.json()
    found = data.get("warmturn") if isinstance(data, dict) else None
    if isinstance(found, dict):
        for field_name in BACKEND_TIMINGS:
            if field_name in found:
                _set_timing(state, field_name, found[field_name])


def make_tap(state: FlowState) -> Callable[[bytes], list[bytes]]:
    """The stream callable of one flow (mitmproxy calls it per chunk, then with b"").

    It returns a list of chunks to send, empty when there is nothing: mitmproxy writes each
    returned chunk as an HTTP/1 chunk, and a zero-length one is the chunked body's terminator, so
    a translator that has nothing to say for a chunk (vLLM's separate usage chunk) must not
    become b"" mid-stream (the client would never see message_delta or message_stop)."""
    t, live = state.t, state.live

    def tap(chunk: bytes) -> list[bytes]:
        now = time.time()
        if chunk and t.first_byte is None:
            t.first_byte = now
        out = live.translate(chunk) if live.translate is not None else chunk
        try:
            events = live.decoder.feed(out) if chunk else live.decoder.feed(out) + live.decoder.flush()
            for ev in events:
                if live.fold.add(ev) and t.first_content is None:
                    t.first_content = now
                read_stream_timings(state, ev)
        except Exception:  # the tap must never break the stream
            logger.exception("warmturn: SSE tap failed")
        live.size += len(out)
        if len(live.copy) + len(out) <= VIEW_COPY_LIMIT:
            live.copy += out
        return [out] if out else []

    return tap


def record_fold(state: FlowState, live: Live) -> None:
    """What the fold saw, into the state (a stream cut short keeps what arrived)."""
    fold = live.fold
    state.usage = fold.usage or None
    state.stop_reason = fold.stop_reason
    state.content = fold.content if state.kind == "messages" else None
    if fold.error:
        state.error = fold.error


class Tap:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = FlowState.of(flow)
        if state is None or flow.response is None or not flow.live:
            return
        state.t.response_headers = time.time()
        resp = flow.response
        read_backend_timings(state, resp.headers)
        if "text/event-stream" in resp.headers.get("content-type", "") and resp.status_code < 400:
            adapter = state.live.adapter
            state.live.translate = adapter.stream_translator(state) if adapter is not None else None
            resp.headers.pop("content-length", None)
            resp.stream = make_tap(state)

    def response(self, flow: http.HTTPFlow) -> None:
        state = FlowState.of(flow)
        if state is None or flow.response is None or not flow.live:
            return
        live = state.live
        t = state.t
        t.end = time.time()
        if t.response_headers is None:
            t.response_headers = flow.response.timestamp_start
        if flow.response.stream:
            if live.copy:
                flow.response.stream = False
                flow.response.raw_content = bytes(live.copy)  # keep the stream for mitmweb's view
            state.size_response = live.size
        else:
            if live.adapter is not None:
                live.adapter.finish_response(flow, state)
            resp = flow.response
            if t.first_byte is None:
                t.first_byte = resp.timestamp_start
            raw = resp.get_content(strict=False) or b""
            state.size_response = len(resp.raw_content or b"")
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            if state.kind == "messages" or resp.status_code >= 400:
                live.fold.add_body(parsed)
            elif state.kind == "count_tokens" and isinstance(parsed, dict) \
                    and isinstance(parsed.get("input_tokens"), int):
                live.fold.usage["input_tokens"] = parsed["input_tokens"]
        record_fold(state, live)
        if state.kind == "messages" and live.fold.content and t.first_content is None:
            t.first_content = t.end

    def error(self, flow: http.HTTPFlow) -> None:
        state = FlowState.of(flow)
        if state is None or not flow.live:
            return
        state.t.end = time.time()
        live = state.live
        if live.size:  # a stream cut short: keep what was seen
            state.size_response = live.size
            record_fold(state, live)
        state.error = {"type": "proxy_error", "message": flow.error.msg if flow.error else "unknown error"}
