"""Which flows are Anthropic API traffic, and where to send them. Pure helpers over flows."""

from __future__ import annotations

import functools
import ipaddress
import socket
import urllib.parse
from collections.abc import Iterable
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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def canonical_ip(host: str) -> IPAddress | None:
    """The address a host string names without DNS, in every spelling a socket accepts:
    ``127.1``, ``2130706433``, ``0x7f.0.0.1`` and ``0177.0.0.1`` (inet_aton's legacy forms),
    ``[::1]``, ``::1%lo``, ``::ffff:127.0.0.1`` (unwrapped to IPv4). None for a name."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.split("%", 1)[0]
    try:
        ip: IPAddress = ipaddress.ip_address(h)
    except ValueError:
        if not h or ":" in h:
            return None
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=256)
def is_local_ip(ip: IPAddress) -> bool:
    """An address of this machine: loopback, unspecified (``0.0.0.0`` reaches local listeners),
    or one a socket can bind to (an interface address)."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
        return True
    except OSError:
        return False


def names_proxy(host: str, port: int, listen: Iterable[tuple[str, int]]) -> bool | None:
    """Whether ``host:port`` is one of the proxy's own listening addresses (`listen`: host,
    port pairs; an empty host or ``0.0.0.0``/``::`` listens on every local address). None when
    `host` is a name that only DNS could tell (callers resolve it and ask again per address)."""
    ports = {p for _, p in listen}
    if port not in ports:
        return False
    if is_loopback(host):
        ip: IPAddress | None = ipaddress.ip_address("127.0.0.1")
    else:
        ip = canonical_ip(host)
    if ip is None:
        return None
    for lhost, lport in listen:
        if lport != port:
            continue
        lip = canonical_ip(lhost) if lhost else None
        if lip is None or lip.is_unspecified:
            if is_local_ip(ip):
                return True
        elif lip == ip or (lip.is_loopback and ip.is_loopback) or (ip.is_unspecified and is_local_ip(lip)):
            return True
    return False


def proxy_listen_addrs(flow: http.HTTPFlow | None = None) -> list[tuple[str, int]]:
    """The proxy's listening (host, port) pairs, from mitmproxy's proxyserver addon (plus the
    address this flow's client connected to)."""
    out: list[tuple[str, int]] = []
    try:
        from mitmproxy import ctx

        server = ctx.master.addons.get("proxyserver")
        out = [(str(a[0]), int(a[1])) for a in server.listen_addrs()] if server is not None else []
    except Exception:  # noqa: BLE001 - no master (unit tests): only the flow's own socket
        out = []
    sock = flow.client_conn.sockname if flow is not None else None
    if sock:
        out.append((str(sock[0]), int(sock[1])))
    return out


def addressed_to_proxy(flow: http.HTTPFlow) -> bool:
    """True for a plain request sent to mitmproxy itself (ANTHROPIC_BASE_URL=http://proxy),
    under any spelling of a loopback or local address (``127.1``, ``[::ffff:127.0.0.1]``…)."""
    req = flow.request
    return bool(names_proxy(req.host, req.port, proxy_listen_addrs(flow)))


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
