"""Backend adapters: what each kind of engine behind the addon needs, in one class per engine.

The seam
--------
The route addon hands every admitted API flow to one :class:`BackendAdapter`, chosen from the
``backend`` and ``backend_api`` options by :func:`make_adapter`. An adapter owns everything that
depends on *what* the backend is (where it is, ``backend``, is :class:`addons.Backend`):

- :meth:`BackendAdapter.prepare` (request hook, async): point the flow at the backend and rewrite
  it for the engine (the model name on *every* route, credentials, paths, a translation), or
  answer locally by returning a response (e.g. an engine without ``count_tokens``);
- :meth:`BackendAdapter.stream_translator`: a per-flow ``bytes -> bytes`` rewriter of the
  response stream into Anthropic SSE (None: the engine already speaks it);
- :meth:`BackendAdapter.finish_response` (response hook): a buffered response made Anthropic's,
  including :meth:`BackendAdapter.map_error`, the engine's error bodies as Anthropic errors.

Implementations: :class:`AnthropicAdapter` (any Anthropic Messages engine, or ``passthrough``),
:class:`EmbeddedAdapter` (the supervised ``python -m warmturn.server``), :class:`OpenAIAdapter` (Chat
Completions engines, translated both ways).

Adding an engine is one class: subclass the adapter of the API it speaks and override what
differs (its model-name mapping, its usage-chunk shapes in :meth:`stream_translator`, its error
bodies in :meth:`map_error`), then return it from :func:`make_adapter` (e.g. for a new
``backend_api`` value). Keep engine quirks here, not in the hooks.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, get_args

from mitmproxy import http

from warmturn.protocol import CLAUDE_MODELS, ErrorType, error_for_status, is_error_body, model_info, page_models
from warmturn.rules import encode_body

from . import api_flows, openai_translate
from .embedded_server import EmbeddedServer
from .relay import can_connect
from .state import FlowState


@dataclass(frozen=True)
class Backend:
    """Where requests go (the parsed ``backend`` option): kind embedded | url | passthrough.
    What the backend speaks is a :class:`addons.backends.BackendAdapter`'s business."""

    kind: str
    scheme: str = "http"
    host: str = ""
    port: int = 0
    prefix: str = ""  # path prefix of the base URL, without trailing slash

    def url_for(self, path: str) -> str:
        default = 443 if self.scheme == "https" else 80
        netloc = self.host if self.port == default else f"{self.host}:{self.port}"
        if ":" in self.host and not self.host.startswith("["):
            netloc = f"[{self.host}]" + ("" if self.port == default else f":{self.port}")
        return f"{self.scheme}://{netloc}{self.prefix}{path}"


def parse_backend(value: str) -> Backend:
    """`embedded`, `passthrough` or an http(s) base URL; raises ValueError otherwise."""
    value = value.strip()
    if value in ("embedded", "passthrough"):
        return Backend(value)
    u = urllib.parse.urlsplit(value)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"backend must be 'embedded', 'passthrough' or an http(s):// base URL, not {value!r}")
    if u.query or u.fragment:
        raise ValueError(f"backend URL must not have a query or fragment: {value!r}")
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as e:
        raise ValueError(f"backend URL has a bad port: {value!r}") from e
    return Backend("url", u.scheme, u.hostname, port, u.path.rstrip("/"))


def route(flow: http.HTTPFlow, backend: Backend, path: str | None = None) -> str:
    """Point the flow at the backend (or, for passthrough, keep/choose the real API). Returns the URL."""
    req = flow.request
    path = req.path if path is None else path
    if backend.kind == "passthrough":
        if api_flows.mode_type(flow) == "regular" and api_flows.addressed_to_proxy(flow):
            req.url = api_flows.ANTHROPIC_URL + path
        return req.url
    req.scheme = backend.scheme
    req.host = backend.host
    req.port = backend.port
    req.path = backend.prefix + path
    default = 443 if backend.scheme == "https" else 80
    if "Host" in req.headers or not (req.is_http2 or req.is_http3):
        req.headers["Host"] = backend.host if backend.port == default else f"{backend.host}:{backend.port}"
    return req.url


#: "does host:port accept connections": the relay's (:meth:`addons.relay.Relay.reachable`, which
#: answers from its pool and keeps the connection it opens) or a plain TCP probe
Probe = Callable[[str, int], Awaitable[bool]]


#: the error types Anthropic's API (and so its clients) know; engines invent others (vLLM: NotFoundError…)
ANTHROPIC_ERROR_TYPES = frozenset(get_args(ErrorType))


def is_anthropic_error(body: Any) -> bool:
    """An Anthropic-shaped error body whose type is one of Anthropic's own."""
    return is_error_body(body) and body["error"].get("type") in ANTHROPIC_ERROR_TYPES


def error_response(status: int, message: str) -> http.Response:
    """An Anthropic-shaped error response, typed by the one status map (warmturn.protocol)."""
    return json_response(error_for_status(status, message), status)


def json_response(obj: Any, status: int = 200) -> http.Response:
    return http.Response.make(status, json.dumps(obj).encode(), {"content-type": "application/json"})


def models_listing() -> dict:
    """``GET /v1/models`` for a backend that cannot answer it: the Claude names clients ask for."""
    return page_models([model_info(m) for m in CLAUDE_MODELS], limit=1000)


class BackendAdapter(Protocol):
    """One kind of backend engine (see the module docstring for the seam)."""

    target: Backend

    async def prepare(self, flow: http.HTTPFlow, state: FlowState) -> http.Response | None:
        """Route and rewrite the request; a returned response answers the client instead."""
        ...

    def stream_translator(self, state: FlowState) -> Callable[[bytes], bytes] | None:
        """A rewriter of this flow's SSE response chunks into Anthropic's, or None."""
        ...

    def finish_response(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """Make a buffered (non-streamed) response Anthropic's, in place."""
        ...

    def map_error(self, status: int, raw: bytes, upstream: str) -> dict:
        """The engine's error body as Anthropic's error shape."""
        ...


class AnthropicAdapter:
    """An engine that speaks Anthropic's Messages API (vLLM, SGLang, llama.cpp, LM Studio…), or
    ``passthrough`` (the original destination, nothing rewritten but normalization)."""

    api = "anthropic"
    #: routes whose JSON body carries a ``model`` to map to ``backend_model``
    MODEL_ROUTES = ("messages", "count_tokens")

    def __init__(self, target: Backend, api_key: str = "", model: str = "",
                 reachable: Probe = can_connect) -> None:
        self.target = target
        self.api_key = api_key
        self.model = model
        self.reachable = reachable

    @property
    def name(self) -> str:
        return self.target.url_for("") if self.target.kind == "url" else self.target.kind

    async def prepare(self, flow: http.HTTPFlow, state: FlowState) -> http.Response | None:
        if self.target.kind == "passthrough":
            state.upstream = route(flow, self.target)
            return None
        self.rewrite(flow, state)
        state.upstream = route(flow, self.target)
        return await self.check_reachable()

    def rewrite(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """The engine's request rewrites: model name and credentials."""
        if self.model and state.kind in self.MODEL_ROUTES and isinstance(state.body, dict):
            flow.request.content = encode_body({**state.body, "model": self.model})
        if self.api_key:
            flow.request.headers.pop("authorization", None)
            flow.request.headers["x-api-key"] = self.api_key

    async def check_reachable(self) -> http.Response | None:
        if self.target.kind == "url" and not await self.reachable(self.target.host, self.target.port):
            return error_response(502, f"warmturn: backend {self.name} is unreachable")
        return None

    def stream_translator(self, state: FlowState) -> Callable[[bytes], bytes] | None:
        return None

    def map_error(self, status: int, raw: bytes, upstream: str) -> dict:
        """Any error body as Anthropic's, typed by status, its message kept and the backend named."""
        message = raw[:2000].decode("utf-8", "replace").strip()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or message)
        elif isinstance(err, str):
            message = err
        return error_for_status(status, f"backend {upstream} returned HTTP {status}: {message}")

    def finish_response(self, flow: http.HTTPFlow, state: FlowState) -> None:
        resp = flow.response
        if state.kind == "models" and resp.status_code >= 400:
            flow.response = json_response(models_listing())
            return
        if resp.status_code >= 400:
            raw = resp.get_content(strict=False) or b""
            try:
                shaped = is_anthropic_error(json.loads(raw))
            except ValueError:
                shaped = False
            # vLLM answers in Anthropic's shape with its own types ({"type": "NotFoundError"}):
            # only bodies typed the way Anthropic's clients expect pass as they are
            if not shaped:
                resp.content = json.dumps(self.map_error(resp.status_code, raw, state.upstream or "?")).encode()
                resp.headers["content-type"] = "application/json"


class EmbeddedAdapter(AnthropicAdapter):
    """The embedded ``python -m warmturn.server`` (Anthropic API), started and watched by the supervise addon."""

    def __init__(self, server: Callable[[], EmbeddedServer | None], api_key: str = "", model: str = "",
                 reachable: Probe = can_connect) -> None:
        super().__init__(Backend("embedded"), api_key, model, reachable)
        self._server = server

    async def prepare(self, flow: http.HTTPFlow, state: FlowState) -> http.Response | None:
        server = self._server()
        if server is None:
            return error_response(503, "warmturn: embedded backend is not running")
        for _ in range(3):
            if not server.is_ready() and not await server.wait_ready(server.start_timeout_s):
                break
            if await self.reachable(server.host, server.port):
                break
            await asyncio.sleep(1.0)  # a dead child is noticed (and restarted) within 0.5 s
        if not server.is_ready() or not await self.reachable(server.host, server.port):
            return error_response(529, f"warmturn: embedded backend {server.base_url} is not "
                                                           f"ready: {server.last_error or 'still starting'}")
        self.rewrite(flow, state)
        state.upstream = route(flow, parse_backend(server.base_url))
        return None


class OpenAIAdapter(AnthropicAdapter):
    """An OpenAI Chat Completions engine (mlx_lm.server, vLLM, Ollama…): requests and responses,
    streamed or not, translated by :mod:`addons.openai_translate`."""

    api = "openai"

    async def prepare(self, flow: http.HTTPFlow, state: FlowState) -> http.Response | None:
        if state.kind == "models":
            return json_response(models_listing())
        if state.kind == "count_tokens":
            # Some OpenAI engines also count Anthropic requests (vLLM serves /v1/messages/count_tokens
            # next to Chat Completions): ask, with the model name mapped; finish_response estimates
            # when the route does not exist there.
            self.rewrite(flow, state)
            self.bearer(flow.request)
            state.upstream = route(flow, self.target)
            return await self.check_reachable()
        if state.kind == "messages":
            if not isinstance(state.body, dict):
                return error_response(400, "request body is not a JSON object")
            try:
                oa = openai_translate.to_openai_request(state.body, self.model or None)
            except ValueError as e:
                return error_response(400, str(e))
            state.translated_from = state.body
            req = flow.request
            req.content = json.dumps(oa, ensure_ascii=False).encode()
            req.headers["content-type"] = "application/json"
            for h in [h for h in req.headers if h.lower().startswith("anthropic-")]:
                req.headers.pop(h, None)
            self.bearer(req)
            state.upstream = route(flow, self.target, "/v1/chat/completions")
        else:
            state.upstream = route(flow, self.target)
        return await self.check_reachable()

    def bearer(self, req: http.Request) -> None:
        """OpenAI-style credentials: the key (backend_api_key, else the client's) as a Bearer token."""
        key = self.api_key or req.headers.get("x-api-key")
        req.headers.pop("x-api-key", None)
        if key:
            req.headers["authorization"] = f"Bearer {key}"

    def stream_translator(self, state: FlowState) -> Callable[[bytes], bytes] | None:
        if state.translated_from is None:
            return None
        return openai_translate.StreamTranslator(state.model or "").feed

    #: statuses of an engine without a count_tokens route (mlx_lm.server, Ollama…)
    NO_ROUTE = (404, 405, 501)

    def finish_response(self, flow: http.HTTPFlow, state: FlowState) -> None:
        resp = flow.response
        if state.kind == "count_tokens" and resp.status_code in self.NO_ROUTE:
            try:
                engine_error = is_error_body(json.loads(resp.get_content(strict=False) or b""))
            except ValueError:
                engine_error = False
            if not engine_error:  # no such route: a rough estimate (~4 chars/token), documented
                flow.response = json_response({"input_tokens": max(1, len(flow.request.raw_content or b"") // 4)})
                return
        if state.translated_from is None or state.kind != "messages" or resp.status_code >= 400:
            super().finish_response(flow, state)
            return
        try:
            raw = resp.get_content(strict=False) or b""
            translated = openai_translate.from_openai_response(json.loads(raw), state.model or "")
        except (ValueError, AttributeError, TypeError) as e:
            translated = error_for_status(502, f"backend {state.upstream} sent an unreadable response: {e}")
            resp.status_code = 502
        resp.content = json.dumps(translated).encode()
        resp.headers["content-type"] = "application/json"


def make_adapter(target: Backend, api: str, *, api_key: str = "", model: str = "",
                 server: Callable[[], EmbeddedServer | None] = lambda: None,
                 reachable: Probe = can_connect) -> BackendAdapter:
    """The adapter for the ``backend`` / ``backend_api`` options. The embedded server speaks
    Anthropic's API and ``passthrough`` keeps the real one, whatever ``backend_api`` says."""
    if target.kind == "embedded":
        return EmbeddedAdapter(server, api_key, model, reachable)
    if api == "openai" and target.kind == "url":
        return OpenAIAdapter(target, api_key, model, reachable)
    return AnthropicAdapter(target, api_key, model, reachable)
