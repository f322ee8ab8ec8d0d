"""One generation through HTTP: submit to the engine, wait for its prefill (never silent: pings),
and turn the engine's items into Anthropic's events, streamed (SSE) or folded into one message;
a client that leaves cancels it (server/http.py's ``messages`` handler drives this)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from warmturn.protocol import (
    MessageStream,
    Usage,
    encode_sse,
    error_body,
)
from warmturn.server import wire
from warmturn.server.engine import (
    Admitted,
    Arrival,
    Done,
    GenerationRequest,
    Piece,
    Prefilled,
    RequestTimeout,
)
from warmturn.server.render import Rendered, openai_tool
from warmturn.server.repetition import RepetitionGuard
from warmturn.server.sampling import clamp_temperature, clamp_top_k
from warmturn.server.state import ApiError, ServerState, engine_error, internal_error_message, request_id
from warmturn.server.toolcalls import OutputAssembler

log = logging.getLogger("warmturn.server.http")  # the one server log name (tests and users filter on it)
request_log = logging.getLogger("warmturn.requests")

README_TOO_LONG = "README.md, section 'Prompt is too long'"


class ClientGone(Exception):
    """The client closed its connection."""


@dataclass
class Call:
    """One /v1/messages request on its way through the engine."""

    request: Request
    req: wire.MessagesRequest
    gen: GenerationRequest
    items: asyncio.Queue
    record: dict[str, Any]
    t_start: float
    ttft_ms: float | None = None

    def log(self, **fields: Any) -> None:
        self.record.update(fields)
        request_log.info("%s", json.dumps(self.record))


def check_context(state: ServerState, n: int) -> None:
    if n >= state.context_length:
        raise ApiError(400, "invalid_request_error", too_long(state, str(n), state.context_length - 1))


def submit(state: ServerState, request: Request, req: wire.MessagesRequest, rendered: Rendered,
           t_start: float, arrival: Arrival | None = None, background: bool = False) -> Call:
    """Queue the generation; engine items arrive on the call's asyncio queue."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def emit(item: object) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass

    n = len(rendered.tokens)
    gen = GenerationRequest(
        tokens=rendered.tokens,
        max_tokens=min(req.max_tokens or 1, state.context_length - n, state.max_output_tokens or state.context_length),
        emit=emit,
        prefix_len=rendered.prefix_len,
        history_len=rendered.history_len,
        temperature=clamp_temperature(state.default_temperature if req.temperature is None else req.temperature),
        top_p=req.top_p or 0.0,
        top_k=clamp_top_k(req.top_k, state.vocab_size),  # mlx-lm refuses top_k >= vocab: see server/sampling.py
        deadline=time.monotonic() + state.request_timeout,
        request_id=request_id(request),
        background=background,
    )
    state.engine.submit(gen, arrival)
    record = {"request_id": gen.request_id, "model": req.model, "stream": req.stream,
              "prompt_tokens": n, "prefix_len": rendered.prefix_len}
    return Call(request, req, gen, items, record, t_start)


def too_long(state: ServerState, tokens: str, limit: int) -> str:
    """The over-context refusal: the size, the served model and its context, and what to do."""
    return (f"prompt is too long: {tokens} tokens > {limit} maximum (the served model {state.model_id} has a "
            f"{state.context_length}-token context; fix: shrink the request, as make claude does for small models, "
            f"or serve a model with a longer context; {README_TOO_LONG})")


async def _first_item(call: Call, poll: float = 0.25, until: float | None = None,
                      watch_client: bool = True) -> object | None:
    """The next engine item, or None once ``time.monotonic()`` passes ``until``; raises
    :class:`RequestTimeout` if the request's time limit passed while it was still queued, or (with
    ``watch_client``) :class:`ClientGone` if the client went away meanwhile. A streaming body does
    not watch: Starlette cancels it when the client leaves."""
    while True:
        wait = poll if until is None else max(0.0, min(poll, until - time.monotonic()))
        try:
            return await asyncio.wait_for(call.items.get(), wait)
        except TimeoutError:
            if time.monotonic() > call.gen.deadline + 1.0:  # still queued: the worker never saw it
                raise RequestTimeout("the request's time limit passed while it waited in the queue") from None
            if until is not None and time.monotonic() >= until:
                return None
            if watch_client and await call.request.is_disconnected():
                raise ClientGone() from None


async def wait_prefilled(state: ServerState, call: Call) -> Prefilled:
    """Wait for the end of prefill. A client that leaves (or a deadline that passes) meanwhile
    withdraws the request: a queued one frees its queue slot at once."""
    try:
        first = await _first_item(call)
        while isinstance(first, Admitted):  # the cache lookup ended; prefill is under way
            first = await _first_item(call)
    except (ClientGone, RequestTimeout, asyncio.CancelledError) as e:
        state.engine.withdraw(call.gen)
        call.log(outcome="timeout" if isinstance(e, RequestTimeout) else "client_gone")
        raise
    return prefilled(call, first)


def prefilled(call: Call, item: object) -> Prefilled:
    """The engine's first item as the end of prefill (recorded in the request's log line); an
    error, or the end of a request cancelled or timed out before it, is raised."""
    if isinstance(item, Exception):
        raise item
    if isinstance(item, Done):  # cancelled or timed out before prefill finished
        raise RequestTimeout("the request's time limit passed before generation started")
    assert isinstance(item, Prefilled)
    call.record.update(reused=item.reused, created=item.created, prefill_ms=round(item.prefill_ms, 1),
                       queued_ms=round(item.queued_ms, 1), parked_ms=round(item.parked_ms, 1))
    return item


def usage_of(first: Prefilled) -> Usage:
    u = first.usage
    return Usage(input_tokens=u.input_tokens, cache_read_input_tokens=u.cache_read_input_tokens,
                 cache_creation_input_tokens=u.cache_creation_input_tokens)


def timing_headers(first: Prefilled) -> dict[str, str]:
    """The engine's view of this request's wait, for the proxy's capture (docs/server.md): as response
    headers of a non-streaming answer (they go out after prefill there)."""
    return {"x-warmturn-queue-ms": f"{first.queued_ms:.1f}", "x-warmturn-prefill-ms": f"{first.prefill_ms:.1f}"}


def timings(first: Prefilled) -> dict[str, float]:
    """The same timings for a stream, whose headers go out before prefill ends: the ``warmturn``
    field of its ``message_delta`` event (docs/server.md)."""
    return {"queue_ms": round(first.queued_ms, 1), "prefill_ms": round(first.prefill_ms, 1)}


def make_assembler(state: ServerState, req: wire.MessagesRequest, stream: MessageStream) -> OutputAssembler:
    fmt = state.tool_format if (req.tools and req.tool_choice.type != "none") else None
    return OutputAssembler(stream, req.stop_sequences, fmt, tools=[openai_tool(t) for t in req.tools],
                           json_mode=req.output_schema is not None)


def hold_replacement_tail(text: str) -> tuple[str, str]:
    """``(ready, held)``: `text` without its trailing U+FFFD characters, and those characters.

    The engine's streaming detokenizer holds back an incomplete UTF-8 sequence while the answer
    goes on, but its ``finalize()`` at the end of an answer (``max_tokens`` cutting a multi-byte
    character) decodes the leftover bytes as U+FFFD. So a trailing U+FFFD is held until the next
    piece shows it was followed by more text, and dropped when the answer ends instead."""
    ready = text.rstrip("\ufffd")
    return ready, text[len(ready):]


#: a cut answer is an error, never a short answer with ``end_turn`` (SIGTERM mid-answer: the
#: engine's stop ends what it runs as ``Done("cancelled")``)
CUT_BY_SHUTDOWN = "the server is shutting down and stopped this answer before its end; retry the request"


async def events(state: ServerState, call: Call, stream: MessageStream,
                 asm: OutputAssembler, extra: dict[str, Any] | None = None) -> AsyncIterator[dict[str, Any]]:
    """Engine items -> Anthropic events; cancels generation when the consumer stops. ``extra``
    fields are added to the ``message_delta`` event."""
    outcome = "cancelled"
    output_tokens = 0
    held = ""  # a trailing U+FFFD: released by the next piece, dropped at the end (hold_replacement_tail)
    guard = RepetitionGuard() if state.repetition_guard else None
    try:
        for ev in stream.start():
            yield ev
        while True:
            item = await call.items.get()
            if isinstance(item, Exception):
                outcome = "error"
                raise item
            if isinstance(item, Piece):
                if call.ttft_ms is None:
                    call.ttft_ms = (time.monotonic() - call.t_start) * 1000
                    state.metrics.ttft.observe(call.ttft_ms / 1000)
                output_tokens = item.output_tokens
                text, held = hold_replacement_tail(held + item.text)
                evs, stop_hit = asm.feed(text)
                for ev in evs:
                    yield ev
                loop = guard.feed(text) if guard is not None and not stop_hit else None
                if loop is not None:  # a looping answer: end it now, honestly incomplete (max_tokens)
                    call.gen.cancel.set()
                    log.warning("repetition guard: %s ended after %d output tokens: its answer repeats %r %d times "
                                "(stop_reason max_tokens; --no-repetition-guard turns this off)", call.gen.request_id,
                                output_tokens, loop.unit[:60], loop.repeats)
                    for ev in asm.finish("length", output_tokens):
                        yield ev | extra if extra and ev["type"] == "message_delta" else ev
                    outcome = "repetition"
                    return
                if stop_hit:
                    call.gen.cancel.set()
                    for ev in asm.finish("stop", output_tokens):
                        yield ev | extra if extra and ev["type"] == "message_delta" else ev
                    outcome = "stop_sequence"
                    return
            elif isinstance(item, Done):
                output_tokens = max(output_tokens, item.output_tokens)
                if item.reason == "cancelled":  # not by us (we stop reading first): the server is stopping
                    outcome = "cut_by_shutdown"
                    raise ApiError(529, "overloaded_error", CUT_BY_SHUTDOWN)
                for ev in asm.finish(item.reason, output_tokens):
                    yield ev | extra if extra and ev["type"] == "message_delta" else ev
                outcome = item.reason
                call.record["decode_tps"] = round(item.decode_tps, 1)
                return
    finally:
        call.gen.cancel.set()  # no-op when finished; stops the worker within one token otherwise
        call.log(outcome=outcome, output_tokens=output_tokens,
                 ttft_ms=round(call.ttft_ms, 1) if call.ttft_ms is not None else None,
                 total_ms=round((time.monotonic() - call.t_start) * 1000, 1))


async def collect_message(call: Call, agen: AsyncIterator[dict[str, Any]], stream: MessageStream,
                          headers: dict[str, str]) -> Response:
    """Non-streaming: run the events to the end (watching for a client that leaves)."""
    try:
        async for _ in _watch_disconnect(agen, call.request):
            pass
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(stream.message(), headers=headers)


def early_usage(call: Call, admitted: Admitted | None) -> Usage:
    """``message_start``'s usage before prefill ends: what the cache lookup read (if it ended),
    the rest as ``input_tokens``; ``message_delta`` has the final split, which clients keep."""
    prompt = call.record["prompt_tokens"]
    reused = min(admitted.reused, prompt - 1) if admitted is not None else 0
    return Usage(input_tokens=prompt - reused, cache_read_input_tokens=reused)


def stream_events(state: ServerState, call: Call, first: Prefilled | None,
                  admitted: Admitted | None = None) -> StreamingResponse:
    """Streaming: SSE bytes. ``first`` is None when the request still waits (in the queue or in
    prefill) after one ping interval: then ``message_start`` goes out at once (usage:
    :func:`early_usage`), and a ``ping`` every ``state.ping_interval`` seconds until the first
    token, so the client never waits on a silent connection. A failure after the stream began
    becomes an ``error`` event."""
    request, req = call.request, call.req
    stream = MessageStream(req.model, usage_of(first) if first else early_usage(call, admitted))
    asm = make_assembler(state, req, stream)

    async def body() -> AsyncIterator[bytes]:
        nonlocal first
        agen: AsyncIterator[dict[str, Any]] | None = None
        try:
            if first is None:
                for ev in stream.start():
                    yield encode_sse(ev)
            while first is None:
                item = await _first_item(call, until=time.monotonic() + state.ping_interval, watch_client=False)
                if item is None:
                    yield encode_sse({"type": "ping"})
                elif not isinstance(item, Admitted):
                    first = prefilled(call, item)
            stream.usage = usage_of(first)
            agen = events(state, call, stream, asm, {"warmturn": timings(first)})
            async for ev in agen:
                yield encode_sse(ev)
        except Exception as e:  # after the stream began: an `error` event, then the end
            known = engine_error(e)
            if known is None:
                log.exception("generation failed mid-stream (request %s)", request_id(request))
            else:
                log.warning("stream of request %s ended with an error: %s", request_id(request), e)
                if first is None:
                    call.log(outcome="timeout" if isinstance(e, RequestTimeout) else "error")
            _, etype, message = known or (500, "api_error", internal_error_message(request))
            yield encode_sse(error_body(etype, message))
        finally:
            if first is None:  # the client left (or it failed) before prefill ended: free its place
                state.engine.withdraw(call.gen)
            if agen is not None:
                await agen.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _watch_disconnect(agen: AsyncIterator[Any], request: Request, poll: float = 0.25) -> AsyncIterator[Any]:
    """Iterate ``agen``, raising :class:`ClientGone` (and closing it) if the client disconnects."""
    it = agen.__aiter__()
    last_check = time.monotonic()
    try:
        while True:
            task = asyncio.ensure_future(it.__anext__())
            while True:
                done, _ = await asyncio.wait({task}, timeout=poll)
                # Check on a clock, not only when the engine is idle: fast decoding yields an
                # item every few ms, and a client that left must still be noticed within `poll`.
                if done and time.monotonic() - last_check < poll:
                    break
                last_check = time.monotonic()
                if await request.is_disconnected():
                    task.cancel()
                    # let the cancelled step finish before `finally` closes the generator: closing
                    # one that is still inside __anext__ raises "aclose(): asynchronous generator
                    # is already running" (a logged 500 instead of the 499)
                    await asyncio.wait({task})
                    raise ClientGone()
                if done:
                    break
            try:
                yield task.result()
            except StopAsyncIteration:
                return
    finally:
        await agen.aclose()  # type: ignore[attr-defined]
