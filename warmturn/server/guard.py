"""The server's front door (pure ASGI middleware): who may talk to it, and how.

A loopback port is not private from the browser. A web page the developer visits can POST to
``http://127.0.0.1:8000`` blind (a "simple" cross-origin request: form or ``text/plain`` body,
no preflight), and with DNS rebinding (``evil.example`` re-resolving to 127.0.0.1) it can read
the answers too. So before any handler runs:

- **Host** must name this server: a loopback name or address, the bound address, an IP literal
  when bound to every interface, or a name listed in ``--allowed-hosts``. A rebinding page
  sends its own name (``Host: evil.example:8000``): 403 ``permission_error``.
- **Origin**, when a browser sends one, must carry an allowed host too: 403 otherwise.
- **Content type**: a POST to ``/v1/*`` must say ``application/json`` (what every SDK and
  Claude Code send). A browser cannot send that cross-origin without a CORS preflight, which
  this server never grants: 415 ``invalid_request_error`` otherwise.
- **API key** (when one is configured): ``/v1/*`` and ``/metrics`` need it in ``x-api-key`` or
  ``Authorization: Bearer``; either one matching is enough (an empty ``x-api-key`` does not
  hide a valid bearer token). ``/`` (Claude Code's start-up ``HEAD /``) and ``/health``
  (liveness probes) stay open; they reveal nothing but the model's name.

Every refusal is Anthropic's error shape. Pure: the checks are plain functions of the headers.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass

from warmturn import protocol
from warmturn.machine import canonical_ip

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str

    @property
    def error_type(self) -> str:
        """Anthropic's error type for the status: the protocol module's one map."""
        return protocol.error_type_for(self.status)


def split_host(value: str) -> str:
    """The host part of a Host header or of an origin's authority, lower-cased, without port
    or IPv6 brackets: ``[::1]:8000`` -> ``::1``, ``Example.COM:80`` -> ``example.com``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value  # no port, or a bare IPv6 address


def allowed_host_names(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Names a Host header may carry for a server bound to `bind_host`, plus `extra`
    (``--allowed-hosts``; ``*`` allows any). Bound to every interface, the machine's own
    host names are added (IP literals are allowed separately, see :func:`host_allowed`)."""
    names = {n.lower() for n in LOOPBACK_NAMES}
    names.add(bind_host.strip().strip("[]").lower())
    if bind_host in WILDCARD_HOSTS:
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.add(name.lower())
    names.update(e.strip().lower() for e in extra if e.strip())
    names.discard("")
    return frozenset(names)


def host_allowed(host: str, names: frozenset[str], bind_host: str) -> bool:
    """Whether a request naming `host` (already split) may be served. IP literals cannot be
    rebound by DNS: any is fine on a server bound to every interface, and on a loopback-bound
    server any loopback address (127.0.0.2, ::ffff:127.0.0.1...) is."""
    if "*" in names or host in names:
        return True
    ip = canonical_ip(host)  # the one reading of an address: 127.1 and ::ffff:127.0.0.1 are 127.0.0.x
    if ip is None:
        return False
    if bind_host in WILDCARD_HOSTS or ip.is_loopback:
        return True
    return str(ip) in names


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def key_matches(headers: Mapping[str, str], api_key: str) -> bool | None:
    """None when no credential was sent, else whether either header carries `api_key`
    (warmturn.protocol.key_matches on the header's raw bytes)."""
    return protocol.key_matches(headers, api_key, encode=lambda s: s.encode("latin-1"))


def check(method: str, path: str, headers: Mapping[str, str], *, names: frozenset[str], bind_host: str,
          api_key: str | None) -> Refusal | None:
    """The first reason to refuse this request, or None. `headers` keys are lower-case."""
    host = headers.get("host")
    if host is not None and not host_allowed(split_host(host), names, bind_host):
        return Refusal(403, f"Host {host!r} is not an address of this server (DNS rebinding protection); "
                            f"start it with --allowed-hosts NAME to accept that name")
    origin = headers.get("origin")
    if origin is not None:
        authority = origin.split("://", 1)[1] if "://" in origin else ""
        if not authority or not host_allowed(split_host(authority.split("/", 1)[0]), names, bind_host):
            return Refusal(403, f"Origin {origin!r} may not use this server: browser pages of other sites are refused")
    protected = path.startswith("/v1/") or path == "/v1" or path == "/metrics"
    if api_key is not None and protected:
        ok = key_matches(headers, api_key)
        if ok is None:
            return Refusal(401, "missing API key: send it in x-api-key or Authorization: Bearer")
        if not ok:
            return Refusal(401, "invalid API key")
    if method == "POST" and path.startswith("/v1/"):
        ctype = headers.get("content-type")
        if ctype is None or _media_type(ctype) != "application/json":
            return Refusal(415, f"content-type must be application/json, not {ctype!r}")
    return None


DRAIN_LIMIT = 1 << 20


#: a request body that sends no bytes for this long is given up on (a Content-Length larger than
#: what is sent, a chunked body without its final chunk): reading it never holds a connection longer
BODY_IDLE_SECONDS = 30.0


async def drain(chunks: AsyncIterator[bytes], limit: int = DRAIN_LIMIT, idle: float = BODY_IDLE_SECONDS) -> None:
    """Read (and drop) up to about ``limit`` bytes of request body before answering without it. A
    server that closes a connection with unread request bytes in its socket makes the kernel send
    a reset, which can destroy the answer before the client (or a proxy) reads it. The one body
    drain: this front door's refusals and http.py's 413/404/405 answers. A body that stalls for
    ``idle`` seconds is left where it is."""
    total = 0
    it = chunks.__aiter__()
    try:
        while total <= limit:
            total += len(await asyncio.wait_for(it.__anext__(), idle))
    except (Exception, StopAsyncIteration):  # noqa: BLE001 - the end, consumed already, stalled, or the client left
        return


async def body_chunks(receive: Callable) -> AsyncIterator[bytes]:
    """An ASGI ``receive`` as the request body's chunks (what :func:`drain` reads)."""
    while True:
        message = await receive()
        if message.get("type") != "http.request":
            return
        yield message.get("body", b"")
        if not message.get("more_body"):
            return


class GuardMiddleware:
    """Pure ASGI: refuse per :func:`check` before routing; `on_refusal(status)` counts it."""

    def __init__(self, app: Callable, *, bind_host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
                 api_key: str | None = None, on_refusal: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.bind_host = bind_host
        self.names = allowed_host_names(bind_host, allowed_hosts)
        self.api_key = api_key
        self.on_refusal = on_refusal

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            name = k.decode("latin-1").lower()
            # a repeated Host or Origin is ambiguous: keep the first, which uvicorn/h11 also use
            headers.setdefault(name, v.decode("latin-1"))
        refusal = check(scope.get("method", "GET"), scope.get("path", "/"), headers, names=self.names,
                        bind_host=self.bind_host, api_key=self.api_key)
        if refusal is None:
            return await self.app(scope, receive, send)
        if self.on_refusal is not None:
            self.on_refusal(refusal.status)
        rid = scope.setdefault("state", {}).setdefault("request_id", protocol.new_id("req_"))
        await drain(body_chunks(receive))
        body = json.dumps(protocol.error_body(refusal.error_type, refusal.message, rid)).encode()
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"request-id", rid.encode())]})
        await send({"type": "http.response.body", "body": body})
