"""The server's shared state and its error plumbing: the ServerState every handler reads, the
pool of renderers, Anthropic-shaped errors (:func:`send_error`, :class:`ApiError`) and the
``guarded`` wrapper that maps engine and unexpected errors to them (server/http.py routes;
server/answer.py streams)."""

from __future__ import annotations

import copy
import functools
import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from warmturn.protocol import (
    error_body,
    error_type_for,
    new_id,
)
from warmturn.server import wire
from warmturn.server.engine import (
    Engine,
    Overloaded,
    RequestTimeout,
    ShuttingDown,
    WorkerDead,
)
from warmturn.server.guard import BODY_IDLE_SECONDS
from warmturn.server.metrics import Metrics
from warmturn.server.render import Rendered, Renderer
from warmturn.server.sampling import vocab_size
from warmturn.server.toolcalls import ToolCallFormat

log = logging.getLogger("warmturn.server.http")  # the one server log name (tests and users filter on it)



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
        return self._grow() or self._free.get()

    def _grow(self) -> Renderer | None:
        """A new renderer with its own tokenizer copy, or None when ``size`` are made already."""
        with self._lock:
            if self._made >= self._size:
                return None
            self._made += 1
        r = Renderer(copy.deepcopy(self.base.tokenizer), prefix_order=self.base.prefix_order, memo=self.base.memo)
        r.history_marks = self.base.history_marks
        return r

    def fill(self) -> None:
        """Make every copy now (the server calls this in the background at start-up). A copy
        takes 0.1-0.3 s here; made on demand, the first requests sent together each paid that
        before reading their prompts, and so missed the step the others were read in."""
        while (r := self._grow()) is not None:
            self._free.put(r)

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
