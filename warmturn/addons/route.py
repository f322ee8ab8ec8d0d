"""Route: send admitted API flows to the backend through its adapter (:mod:`addons.backends`).

Parses ``backend`` / ``backend_api`` / ``backend_api_key`` / ``backend_model`` once in
``configure`` into one :class:`~addons.backends.BackendAdapter`, and sends the flows of http(s)
backends through the relay (:mod:`addons.relay`). It also answers ``CONNECT api.anthropic.com``
itself and skips the server-first TLS handshake: those requests go to the backend or, with
``passthrough``, through the relay to the real API, so mitmproxy never dials Anthropic itself (an
unreachable API is then the relay's Anthropic-shaped 502, not mitmproxy's page).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from mitmproxy import ctx, exceptions, http, tls

from . import api_flows
from .backends import BackendAdapter, error_response, make_adapter, parse_backend
from .embedded_server import EmbeddedServer
from .hooks import BackendHook, announce
from .relay import TOKEN_HEADER, Relay, TlsSettings
from .state import FlowState

logger = logging.getLogger(__name__)


#: mitmproxy's options for its TLS connections to servers that the relay's TLS client honours too
TLS_OPTIONS = ("ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir",
               "client_certs")


def tls_settings() -> TlsSettings:
    """The relay's TLS settings from mitmproxy's options of the same names."""
    o = ctx.options
    return TlsSettings(insecure=bool(getattr(o, "ssl_insecure", False)),
                       trusted_ca=getattr(o, "ssl_verify_upstream_trusted_ca", None) or None,
                       trusted_confdir=getattr(o, "ssl_verify_upstream_trusted_confdir", None) or None,
                       client_certs=getattr(o, "client_certs", None) or None)


class Route:
    def __init__(self) -> None:
        self.relay = Relay()  # finishes responses of backends that die mid-request
        self.target = parse_backend("embedded")
        self.backend = "embedded"  # the option as given, and the API: recorded in every flow's state
        self.api = "anthropic"
        self.embedded: EmbeddedServer | None = None  # announced by the supervise addon
        self.adapter: BackendAdapter = self._make("anthropic", "", "")
        self._relay_started: asyncio.Future | None = None

    def load(self, loader) -> None:
        loader.add_option("backend", str, "embedded",
                          "Where Anthropic API requests go: 'embedded' (start and supervise the project's MLX "
                          "server, python -m warmturn.server), 'passthrough' (keep the original destination: capture and "
                          "normalize only), or a base URL such as http://127.0.0.1:8000.")
        loader.add_option("backend_api", str, "anthropic",
                          "API a URL backend speaks: 'anthropic' (Messages API) or 'openai' (Chat Completions; "
                          "the addon translates requests and streamed responses both ways). The embedded server "
                          "speaks Anthropic's API and passthrough keeps the real one, whatever this says.",
                          choices=("anthropic", "openai"))
        loader.add_option("backend_api_key", str, "",
                          "Credential sent to the backend instead of the client's (x-api-key for anthropic, "
                          "Authorization: Bearer for openai). Empty forwards the client's.")
        loader.add_option("backend_model", str, "",
                          "Model name sent to the backend instead of the client's claude-* name (e.g. "
                          "'default_model' for mlx_lm.server), on every route that names a model. Empty "
                          "forwards the client's.")
        # mitmproxy loads scripts on its running event loop, and its listeners can take requests
        # before the `running` hook: the relay starts now, and requests wait for it (none in unit
        # tests, which load addons without a loop: there flows go to the backend directly)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            self._relay_started = asyncio.ensure_future(self.relay.start())

    def _make(self, api: str, key: str, model: str) -> BackendAdapter:
        return make_adapter(self.target, api, api_key=key, model=model, server=lambda: self.embedded,
                            reachable=self.relay.reachable)

    def warmturn_describe(self, facts: dict) -> None:
        """:class:`~addons.hooks.DescribeHook`: where requests go."""
        facts["backend"] = ctx.options.backend.strip()

    def warmturn_embedded_server(self, server: EmbeddedServer | None) -> None:
        """:class:`~addons.hooks.EmbeddedServerHook`: the embedded server to send requests to."""
        self.embedded = server

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if "backend" in updated:
            try:
                self.target = parse_backend(o.backend)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e
            self.backend = o.backend.strip()
            announce(BackendHook(self.target))
        if "backend_api" in updated and o.backend_api not in ("anthropic", "openai"):
            raise exceptions.OptionsError(f"backend_api must be 'anthropic' or 'openai', not {o.backend_api!r}")
        if updated & {"backend", "backend_api", "backend_api_key", "backend_model"}:
            self.api = o.backend_api
            self.adapter = self._make(o.backend_api, o.backend_api_key, o.backend_model)
        if updated & {"backend", *TLS_OPTIONS}:
            self.relay.tls = tls_settings()
            if self.target.kind == "url" and self.target.scheme == "https":
                try:  # an unreadable CA or client-certificate file is an option error, not a 502 per request
                    self.relay.tls_context(self.target.host)  # made now, on start-up, not on the first request
                except (OSError, ValueError) as e:
                    raise exceptions.OptionsError(f"backend {o.backend}: cannot set up TLS: {e}") from e

    async def running(self) -> None:
        await self.relay.start()

    def done(self) -> None:
        self.relay.close()

    @staticmethod
    def _api_host(host: str | None) -> bool:
        """Anthropic's API host: its requests go to the backend, or with passthrough through the
        relay to the real API, so mitmproxy never needs its own connection there."""
        return (host or "").lower() in api_flows.ANTHROPIC_HOSTS

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not self._api_host(flow.request.host):
            return
        reply = http.Response.make(200)
        reply.headers.pop("content-length", None)  # RFC 9110 9.3.6: none in a 2xx reply to CONNECT
        reply.http_version = flow.request.http_version
        reply.reason = "Connection established"
        flow.response = reply

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if self._api_host(data.client_hello.sni):
            data.establish_server_tls_first = False

    async def request(self, flow: http.HTTPFlow) -> None:
        state = FlowState.admitted(flow)
        if state is None:
            return
        state.backend, state.backend_api = self.backend, self.api
        if flow.response or flow.error:
            return
        if self._relay_started is not None:
            await self._relay_started
        adapter = self.adapter
        state.live.adapter = adapter
        try:
            answer = await adapter.prepare(flow, state)
        except Exception as e:
            logger.exception("warmturn: routing flow %s failed", flow.id)
            answer = error_response(502, f"warmturn: could not route this request ({type(e).__name__})")
        if answer is not None:
            flow.response = answer
        else:
            self._via_relay(flow, adapter)
        state.size_forwarded = len(flow.request.raw_content or b"")
        state.t.sent = time.time()

    def _via_relay(self, flow: http.HTTPFlow, adapter: BackendAdapter) -> None:
        """Send a flow bound for an http:// or https:// backend (with passthrough, the real API)
        through the relay (:mod:`addons.relay`), which is the TLS client of an https:// one."""
        req = flow.request
        if not self.relay.port or req.scheme not in ("http", "https"):
            return
        token = self.relay.register(req.host, req.port, getattr(adapter, "api", "anthropic"), tls=req.scheme == "https")
        host_header = req.headers.get("host")
        req.scheme, req.host, req.port = "http", "127.0.0.1", self.relay.port
        if host_header is not None:
            req.headers["host"] = host_header  # the backend still sees its own name
        req.headers[TOKEN_HEADER.decode()] = token

    def response(self, flow: http.HTTPFlow) -> None:
        flow.request.headers.pop(TOKEN_HEADER.decode(), None)  # spent: not for the capture or the view

    def error(self, flow: http.HTTPFlow) -> None:
        flow.request.headers.pop(TOKEN_HEADER.decode(), None)
