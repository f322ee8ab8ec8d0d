"""Which flows are Anthropic API traffic, and where to send them. Pure helpers over flows."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from mitmproxy import http

from warmturn.plumbing import is_loopback

ANTHROPIC_HOSTS = frozenset({"api.anthropic.com"})
ANTHROPIC_URL = "https://api.anthropic.com"


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


def mode_of(flow: http.HTTPFlow) -> str:
    mode = flow.client_conn.proxy_mode
    return mode.full_spec if mode is not None else "regular"


def mode_type(flow: http.HTTPFlow) -> str:
    mode = flow.client_conn.proxy_mode
    return mode.type_name if mode is not None else "regular"


def addressed_to_proxy(flow: http.HTTPFlow) -> bool:
    """True for a plain request sent to mitmproxy itself (ANTHROPIC_BASE_URL=http://proxy)."""
    sock = flow.client_conn.sockname
    if not sock:
        return False
    req = flow.request
    if req.port != sock[1]:
        return False
    host = req.host
    return host == sock[0] or (is_loopback(host) and is_loopback(sock[0]))


def is_api_flow(flow: http.HTTPFlow) -> bool:
    """Flows the addon handles: reverse-proxied traffic, traffic to api.anthropic.com, and
    requests addressed to the proxy itself. Everything else passes through untouched."""
    kind = mode_type(flow)
    if kind == "reverse":
        return True
    if flow.request.pretty_host.lower() in ANTHROPIC_HOSTS:
        return True
    return kind == "regular" and addressed_to_proxy(flow)


def route(flow: http.HTTPFlow, backend: Backend, path: str | None = None) -> str:
    """Point the flow at the backend (or, for passthrough, keep/choose the real API). Returns the URL."""
    req = flow.request
    path = req.path if path is None else path
    if backend.kind == "passthrough":
        if mode_type(flow) == "regular" and addressed_to_proxy(flow):
            req.url = ANTHROPIC_URL + path
        return req.url
    req.scheme = backend.scheme
    req.host = backend.host
    req.port = backend.port
    req.path = backend.prefix + path
    default = 443 if backend.scheme == "https" else 80
    if "Host" in req.headers or not (req.is_http2 or req.is_http3):
        req.headers["Host"] = backend.host if backend.port == default else f"{backend.host}:{backend.port}"
    return req.url
