"""HTTP routing for the Anthropic Messages API: thin handlers over wire, render and engine.

Why Starlette on uvicorn: this server needs incremental SSE writes (``StreamingResponse``
sends each event as it is produced), prompt detection of a client that went away (Starlette
listens for ``http.disconnect`` while streaming and cancels the body iterator; before the
stream starts we poll ``is_disconnected``), and many cheap concurrent requests (count_tokens,
health, models) beside one long generation: on one asyncio loop they cost a coroutine each
and never wait for the MLX worker thread. The standard library's ``http.server`` gives one
thread per connection and no disconnect signal; a full framework adds nothing we use.

Every response carries a ``request-id`` header; every error is Anthropic's
``{"type": "error", "error": {...}, "request_id": ...}`` through :func:`send_error`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from anyio import to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from warmturn.server import wire
from warmturn.server.engine import (
    Arrival,
    Done,
    Engine,
    GenerationRequest,
    Overloaded,
    Admitted,
    Piece,
    Prefilled,
    RequestTimeout,
    ShuttingDown,
    WorkerDead,
)
from warmturn.server.guard import BODY_IDLE_SECONDS, DRAIN_LIMIT, GuardMiddleware, drain
from warmturn.server.metrics import Metrics
from warmturn.server.render import Renderer, Rendered, openai_tool
from warmturn.server.sampling import clamp_temperature, clamp_top_k, vocab_size
from warmturn.protocol import (
    CLAUDE_MODELS,
    MODELS_CREATED_AT,
    MessageStream,
    Usage,
    encode_sse,
    error_body,
    error_type_for,
    is_claude_model,
    model_info,
    new_id,
    page_models,
    side_request,
)
from warmturn.server.repetition import RepetitionGuard
from warmturn.server.toolcalls import OutputAssembler, ToolCallFormat

log = logging.getLogger(__name__)
request_log = logging.getLogger("warmturn.requests")

README_TOO_LONG = "README.md, section 'Prompt is too long'"


class RendererPool:
    """Tokenizing never waits on a global lock: each renderer has its own tokenizer copy (fast
    tokenizers are not safe to use from two threads at once) and a request takes a free one,
    making another copy when all are in use, up to ``size``; beyond that it waits for one."""

    def __init__(self, renderer: Renderer, size: int = 4) -> None:
        self.base = renderer
        self._free: queue.LifoQueue[Renderer] = queue.LifoQueue()
        self._free.put(renderer)
        self._made = 1
        self._size = size
        self._lock = threading.Lock()

    def _take(self) -> Renderer:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            grow = self._made < self._size
            if grow:
                self._made += 1
        if grow:
            r = Renderer(copy.deepcopy(self.base.tokenizer), prefix_order=self.base.prefix_order)
            r.history_marks = self.base.history_marks
            return r
        return self._free.get()

    def render(self, req: wire.MessagesRequest) -> Rendered:
        r = self._take()
        try:
            return r.render(req)
        finally:
            self._free.put(r)


@dataclass
class ServerState:
    engine: Engine
    renderer: Renderer
    model_id: str
    context_length: int
    tool_format: ToolCallFormat
    api_key: str | None = None
    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()  # extra Host names (--allowed-hosts), see server/guard.py
    max_body_bytes: int = 32 * 1024 * 1024
    request_timeout: float = 600.0
    default_temperature: float = 1.0
    max_output_tokens: int = 0  # 0: no cap beyond the context
    renderers: RendererPool | None = None
    body_idle_timeout: float = BODY_IDLE_SECONDS  # a request body stalled this long is a 408 (server/guard.py)
    vocab_size: int = 0  # the model's logits width (top_k at or above it is sent as 0); 0: the engine's model's
    ping_interval: float = 5.0  # seconds between `ping` events while a stream waits for its first token
    repetition_guard: bool = False  # end a looping answer early as max_tokens (server/repetition.py)

    def __post_init__(self) -> None:
        if self.renderers is None:
            self.renderers = RendererPool(self.renderer)
        if not self.vocab_size:
            self.vocab_size = vocab_size(getattr(self.engine, "model", None))

    @property
    def metrics(self) -> Metrics:
        return self.engine.metrics


class ApiError(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


def request_id(request: Request) -> str:
    return request.scope.setdefault("state", {}).setdefault("request_id", new_id("req_"))


def send_error(request: Request, status: int, message: str, error_type: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """The one place errors are produced: Anthropic's shape, status, and the request id."""
    rid = request_id(request)
    etype = error_type or error_type_for(status)
    return JSONResponse(error_body(etype, message, rid), status_code=status,
                        headers={"request-id": rid, **(headers or {})})


class RequestIdMiddleware:
    """Pure ASGI: give every request an id and put it in a ``request-id`` response header."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = scope.setdefault("state", {}).setdefault("request_id", new_id("req_"))

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"request-id"]
                headers.append((b"request-id", rid.encode()))
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, send_with_id)


def engine_error(e: Exception) -> tuple[int, str, str] | None:
    """(status, Anthropic error type, message) of an error the engine or a handler raises on
    purpose; None for anything else (a bug)."""
    if isinstance(e, ApiError):
        return e.status, e.error_type, e.message
    if isinstance(e, wire.RequestError):
        return 400, "invalid_request_error", str(e)
    if isinstance(e, Overloaded):
        return 529, "overloaded_error", str(e)
    if isinstance(e, RequestTimeout):
        return 504, "timeout_error", str(e)
    if isinstance(e, ShuttingDown):  # retryable: a stream that began before prefill ended says so too
        return 503, "overloaded_error", str(e)
    if isinstance(e, WorkerDead):
        return 503, "api_error", str(e)
    return None


def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Map exceptions to Anthropic errors; count the request by endpoint and status."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        state: ServerState = request.app.state.warmturn
        try:
            resp = await handler(request)
        except Exception as e:
            known = engine_error(e)
            if known is None:  # a bug must not kill the server: 500, logged with its traceback
                log.exception("unhandled error in %s (request %s)", handler.__name__, request_id(request))
                resp = send_error(request, 500, internal_error_message(request))
            else:
                status, etype, message = known
                retry = {"retry-after": str(e.retry_after)} if isinstance(e, Overloaded) else None
                resp = send_error(request, status, message, etype, headers=retry)
        state.metrics.requests.labels(endpoint=handler.__name__, status=str(resp.status_code)).inc()
        return resp

    return wrapper


def internal_error_message(request: Request) -> str:
    """What a client sees of a server bug: no exception text (it can hold paths, prompt
    fragments or library internals), only the id to find the traceback in the log."""
    return f"internal server error; the server log has the details under request id {request_id(request)}"


#: an oversized body is still read (and dropped) up to this many bytes past the limit before the 413
#: goes out. A server that closes a connection with unread request bytes makes the kernel reset
#: it, and the reset can destroy the 413 before the client reads it: uvicorn closes right after
#: answering a client that sent ``Connection: close`` (as warmturn's relay does). Larger bodies
#: are answered at once.
OVERSIZE_DRAIN_BYTES = 64 * 1024 * 1024


async def read_json(request: Request, limit: int, idle: float = BODY_IDLE_SECONDS) -> Any:
    """The request's JSON body, at most `limit` bytes (else a 413 once the rest is drained); a
    body that stalls for `idle` seconds is a 408."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is not None and size > limit:
        # a client that asked `Expect: 100-continue` sends no body before it is told to (uvicorn sends
        # the 100 only once the body is read), so it gets its answer without sending one
        if size <= limit + OVERSIZE_DRAIN_BYTES and request.headers.get("expect", "").lower() != "100-continue":
            await drain(request.stream(), limit + OVERSIZE_DRAIN_BYTES, idle)
        raise ApiError(413, "request_too_large", f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    stream = request.stream()
    it = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(it.__anext__(), idle)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(408, "invalid_request_error",
                           f"the request body stopped arriving after {size} bytes: none for {idle:g} s (a "
                           "Content-Length larger than the body, or a chunked body without its last chunk)") from None
        size += len(chunk)
        if size > limit:
            await drain(it, limit + OVERSIZE_DRAIN_BYTES - size, idle)  # the rest (see OVERSIZE_DRAIN_BYTES)
            raise ApiError(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return wire.decode_json(b"".join(chunks))


COUNT_LIMIT_CONTEXTS = 8  # count_tokens counts prompts up to 8 context windows long


def refuse_before_tokenizing(state: ServerState, req: wire.MessagesRequest, limit: int) -> None:
    """400 when the prompt certainly has more than `limit` tokens, judged from a lower bound
    computed without the tokenizer (``Renderer.min_tokens``): a 30 MB prompt is refused at
    once instead of after a minute of tokenizing."""
    floor = state.renderer.min_tokens(req)
    if floor > limit:
        raise ApiError(400, "invalid_request_error", too_long(state, f"at least {floor}", limit))


def too_long(state: ServerState, tokens: str, limit: int) -> str:
    """The over-context refusal: the size, the served model and its context, and what to do."""
    return (f"prompt is too long: {tokens} tokens > {limit} maximum (the served model {state.model_id} has a "
            f"{state.context_length}-token context; fix: shrink the request, as make claude does for small models, "
            f"or serve a model with a longer context; {README_TOO_LONG})")


async def render(state: ServerState, req: wire.MessagesRequest) -> Rendered:
    """Tokenize on a worker thread (never the MLX worker), with a renderer of its own."""
    assert state.renderers is not None
    return await to_thread.run_sync(state.renderers.render, req)


# --------------------------------------------------------------------------- handlers


@guarded
async def root(request: Request) -> Response:
    if request.method == "HEAD":
        return Response(status_code=200)
    return PlainTextResponse("warmturn server: Anthropic Messages API at /v1/messages\n")


@guarded
async def health(request: Request) -> Response:
    state: ServerState = request.app.state.warmturn
    if not state.engine.alive:
        return send_error(request, 503, "unhealthy: the MLX worker thread has died; restart the server", "api_error")
    return JSONResponse({"status": "ok", "model": state.model_id, "queue_depth": state.engine.depth,
                         "busy": state.engine.busy, "running": state.engine.running,
                         "context_length": state.context_length, "max_output_tokens": state.max_output_tokens or None,
                         "cache": state.engine.cache_info()})


@guarded
async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.warmturn
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


def _models(state: ServerState) -> list[dict[str, Any]]:
    ids = [state.model_id] + [a for a in CLAUDE_MODELS if a != state.model_id]
    return [model_info(i, i if i == state.model_id else f"{i} (served by {state.model_id})", MODELS_CREATED_AT)
            for i in ids]


@guarded
async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.warmturn
    q = request.query_params
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        raise ApiError(400, "invalid_request_error", "limit: expected an integer") from None
    return JSONResponse(page_models(_models(state), limit=limit, after_id=q.get("after_id"),
                                    before_id=q.get("before_id")))


@guarded
async def get_model(request: Request) -> Response:
    state: ServerState = request.app.state.warmturn
    model_id = request.path_params["model_id"]
    for m in _models(state):
        if m["id"] == model_id:
            return JSONResponse(m)
    if is_claude_model(model_id):  # any Claude name is served by the loaded model
        return JSONResponse(model_info(model_id, f"{model_id} (served by {state.model_id})", MODELS_CREATED_AT))
    raise ApiError(404, "not_found_error", f"model: {model_id}")


@guarded
async def count_tokens(request: Request) -> Response:
    state: ServerState = request.app.state.warmturn
    body = await read_json(request, state.max_body_bytes, state.body_idle_timeout)
    req = wire.parse_messages_request(body, count_only=True)
    refuse_before_tokenizing(state, req, COUNT_LIMIT_CONTEXTS * state.context_length)
    rendered = await render(state, req)
    return JSONResponse(wire.count_tokens_body(len(rendered.tokens)))


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


@guarded
async def messages(request: Request) -> Response:
    state: ServerState = request.app.state.warmturn
    t_start = time.monotonic()
    with state.engine.arriving() as arrival:  # others sent at the same moment start together
        body = await read_json(request, state.max_body_bytes, state.body_idle_timeout)
        req = wire.parse_messages_request(body)
        refuse_before_tokenizing(state, req, state.context_length - 1)
        rendered = await render(state, req)
        check_context(state, len(rendered.tokens))
        # Claude Code's conversation title is written beside the first turn, which the user
        # waits for: the title reads its prompt after the turns (server/scheduler.py: rank)
        background = side_request(request.headers, body) == "title"
        call = submit(state, request, req, rendered, t_start, arrival, background)
    try:
        if not req.stream:  # silent until the answer is whole: bounded by --request-timeout (docs/server.md)
            first = await wait_prefilled(state, call)
            stream = MessageStream(req.model, usage_of(first))
            agen = events(state, call, stream, make_assembler(state, req, stream))
            return await collect_message(call, agen, stream, timing_headers(first))
        # A stream whose prefill ends within one ping interval starts as it always did (an early error
        # is still an HTTP status); one that waits longer starts now and gets pings (stream_events).
        until, admitted = time.monotonic() + state.ping_interval, None
        item = await _first_item(call, until=until)
        while isinstance(item, Admitted):  # the cache lookup ended: its counts, for an early start
            admitted, item = item, await _first_item(call, until=until)
    except (ClientGone, RequestTimeout, asyncio.CancelledError) as e:
        if req.stream:  # (wait_prefilled withdraws and logs by itself)
            state.engine.withdraw(call.gen)
            call.log(outcome="timeout" if isinstance(e, RequestTimeout) else "client_gone")
        if isinstance(e, ClientGone):
            return Response(status_code=499)  # nobody is listening any more
        raise
    return stream_events(state, call, None if item is None else prefilled(call, item), admitted)


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


async def not_found(request: Request, exc: HTTPException) -> Response:
    await drain(request.stream(), DRAIN_LIMIT)  # no unread body left behind
    if exc.status_code == 404:
        return send_error(request, 404, f"{request.method} {request.url.path}: no such endpoint")
    if exc.status_code == 405:
        return send_error(request, 405, f"{request.method} is not allowed on {request.url.path}")
    return send_error(request, exc.status_code, str(exc.detail))


def make_app(state: ServerState) -> Starlette:
    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    app.router.redirect_slashes = False  # POST /v1/messages/ is a 404 error body, not a 307
    app.state.warmturn = state
    app.add_middleware(GuardMiddleware, bind_host=state.bind_host, allowed_hosts=state.allowed_hosts,
                       api_key=state.api_key,
                       on_refusal=lambda status: state.metrics.requests.labels(endpoint="guard",
                                                                               status=str(status)).inc())
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so refusals carry the id too
    return app
