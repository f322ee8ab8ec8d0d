"""Which flows are Anthropic API traffic: reverse-proxied flows, flows to api.anthropic.com, and
requests addressed to the proxy itself under any spelling of its address (which also tells the
gate what would loop). Pure helpers over flows."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from mitmproxy import http

from warmturn.machine import IPAddress, canonical_ip, is_local_ip, is_loopback

ANTHROPIC_HOSTS = frozenset({"api.anthropic.com"})
ANTHROPIC_URL = "https://api.anthropic.com"


def mode_of(flow: http.HTTPFlow) -> str:
    mode = flow.client_conn.proxy_mode
    return mode.full_spec if mode is not None else "regular"


def mode_type(flow: http.HTTPFlow) -> str:
    mode = flow.client_conn.proxy_mode
    return mode.type_name if mode is not None else "regular"


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
