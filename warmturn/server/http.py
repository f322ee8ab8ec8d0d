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

This module holds the routes and their handlers; the state they share and the error plumbing
are in server/state.py, one generation's wait, events and streaming in server/answer.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from anyio import to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from warmturn.protocol import (
    CLAUDE_MODELS,
    MODELS_CREATED_AT,
    MessageStream,
    is_claude_model,
    model_info,
    page_models,
    side_request,
)
from warmturn.server import wire
from warmturn.server.answer import (  # noqa: F401  (hold_replacement_tail: tests import it from here)
    Call,
    ClientGone,
    _first_item,
    _watch_disconnect,
    check_context,
    collect_message,
    events,
    hold_replacement_tail,
    make_assembler,
    prefilled,
    stream_events,
    submit,
    timing_headers,
    too_long,
    usage_of,
    wait_prefilled,
)
from warmturn.server.engine import (
    Admitted,
    RequestTimeout,
)
from warmturn.server.guard import BODY_IDLE_SECONDS, DRAIN_LIMIT, GuardMiddleware, drain
from warmturn.server.render import Rendered
from warmturn.server.state import (  # noqa: F401  (ServerState: __main__ and tests import it from here)
    OVERSIZE_DRAIN_BYTES,
    ApiError,
    RendererPool,
    RequestIdMiddleware,
    ServerState,
    guarded,
    request_id,
    send_error,
)


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
