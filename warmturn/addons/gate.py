"""Gate: who may use the proxy, and which flows are warmturn's.

Refuses non-loopback clients unless ``allow_remote``, on every way in: plain HTTP and CONNECT get
a 403 ``permission_error``; any other connection mitmproxy would open for such a client (a TCP or
UDP flow, SOCKS, a WebSocket, an eager upstream connect…) is killed in ``server_connect``, and
DNS queries are dropped. Refuses traffic addressed to the proxy itself under any spelling of its
address (``127.1:8080``, ``[::ffff:127.0.0.1]:8080``, ``2130706433``, ``0.0.0.0``, a name that
resolves to a local address…), which would otherwise loop until the process runs out of file
descriptors. Admits API flows by attaching their :class:`~addons.state.FlowState`, and checks
``client_api_key`` in constant time. Everything else passes through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from mitmproxy import connection, ctx, dns, http, tcp, udp
from mitmproxy.proxy import mode_specs, server_hooks

from warmturn import protocol
from warmturn.machine import is_loopback
from warmturn.protocol import request_kind

from . import api_flows
from .backends import error_response
from .state import FlowState

logger = logging.getLogger(__name__)

LOOP_MESSAGE = "warmturn: this request is addressed to the proxy itself (it would loop); refused"
BACKEND_ONLY_MESSAGE = "warmturn forwards API requests to its backend only (addon option backend_only)"


def is_remote_client(client: connection.Client | None) -> bool:
    """The client is neither on this machine's loopback nor a local-mode (same process) client."""
    if client is None or isinstance(client.proxy_mode, mode_specs.LocalMode):
        return False
    peer = client.peername
    return bool(peer) and not is_loopback(str(peer[0]))


def is_remote(flow: http.HTTPFlow) -> bool:
    """The flow's client is not on this machine's loopback."""
    return is_remote_client(flow.client_conn)


def client_key_ok(req: http.Request, key: str) -> bool:
    """x-api-key or the bearer token (either one) equals `key`, compared in constant time."""
    return bool(protocol.key_matches(req.headers, key))


async def targets_proxy(host: str, port: int, listen: list[tuple[str, int]]) -> bool:
    """Whether connecting to host:port would reach this proxy; names are resolved (off the
    event loop) only when the port is one of the proxy's."""
    verdict = api_flows.names_proxy(host, port, listen)
    if verdict is not None:
        return verdict
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), 5)
    except (TimeoutError, OSError, UnicodeError):
        return False
    return any(api_flows.names_proxy(str(info[4][0]), port, listen) for info in infos)


class Gate:
    def load(self, loader) -> None:
        loader.add_option("allow_remote", bool, False,
                          "Serve non-loopback clients. Off by default: others get 403 permission_error (HTTP and "
                          "CONNECT) or are disconnected (any other protocol).")
        loader.add_option("client_api_key", str, "",
                          "If set, API requests must carry this key (x-api-key or Authorization: Bearer), "
                          "else 401 authentication_error.")
        loader.add_option("backend_only", bool, False,
                          "Forward nothing but API flows to the configured backend: any other request (a "
                          "foreign Host, an absolute-form URL) gets 403 permission_error and a CONNECT to any "
                          "host but api.anthropic.com is refused. Off by default: as a regular proxy "
                          "(HTTPS_PROXY) mitmdump forwards the client's other traffic like any mitmproxy.")

    # -- every way in -------------------------------------------------------------------------

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """The backstop: no upstream connection for a remote client, none to the proxy itself."""
        if data.server.error:
            return
        if not ctx.options.allow_remote and is_remote_client(data.client):
            logger.warning("warmturn: refused an upstream connection for non-loopback client %s",
                           data.client.peername[0])
            data.server.error = "warmturn serves loopback clients only (addon option allow_remote)"
            return
        address = data.server.address
        if address and await targets_proxy(str(address[0]), int(address[1]), api_flows.proxy_listen_addrs()):
            logger.warning("warmturn: refused a connection to the proxy itself (%s:%s)", address[0], address[1])
            data.server.error = LOOP_MESSAGE

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        if not ctx.options.allow_remote and is_remote_client(flow.client_conn) and flow.killable:
            flow.kill()

    def udp_start(self, flow: udp.UDPFlow) -> None:
        if not ctx.options.allow_remote and is_remote_client(flow.client_conn) and flow.killable:
            flow.kill()

    def dns_request(self, flow: dns.DNSFlow) -> None:
        if not ctx.options.allow_remote and is_remote_client(flow.client_conn) and flow.killable:
            flow.kill()

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if not ctx.options.allow_remote and is_remote(flow) and flow.killable:
            flow.kill()

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not ctx.options.allow_remote and is_remote(flow):
            logger.warning("warmturn: refused CONNECT %s:%s from non-loopback client %s", flow.request.host,
                           flow.request.port, flow.client_conn.peername[0])
            flow.response = error_response(403, "warmturn serves loopback clients only (addon option allow_remote)")
            return
        if await targets_proxy(flow.request.host, flow.request.port, api_flows.proxy_listen_addrs(flow)):
            logger.warning("warmturn: refused CONNECT to the proxy itself (%s:%s)", flow.request.host,
                           flow.request.port)
            flow.response = error_response(400, LOOP_MESSAGE)
            return
        if ctx.options.backend_only and flow.request.host.lower() not in api_flows.ANTHROPIC_HOSTS:
            flow.response = error_response(403, BACKEND_ONLY_MESSAGE)

    # -- HTTP -----------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        o = ctx.options
        if not o.allow_remote and is_remote(flow):
            logger.warning("warmturn: refused non-loopback client %s (set allow_remote=true to serve it)",
                           flow.client_conn.peername[0])
            flow.response = error_response(403, "warmturn serves loopback clients only (addon option allow_remote)")
            return
        if not api_flows.is_api_flow(flow):
            if api_flows.mode_type(flow) == "regular" and await targets_proxy(
                    flow.request.host, flow.request.port, api_flows.proxy_listen_addrs(flow)):
                flow.response = error_response(400, LOOP_MESSAGE)
            elif o.backend_only:
                flow.response = error_response(403, BACKEND_ONLY_MESSAGE)
            return
        req = flow.request
        codings = [c.strip().lower() for c in ",".join(req.headers.get_all("transfer-encoding")).split(",") if c.strip()]
        if codings not in ([], ["chunked"]):  # the relay (h11) frames chunked only
            flow.response = error_response(400, f"Transfer-Encoding: {', '.join(codings)} is not supported: send "
                                                "the body plain (chunked or with a Content-Length)")
            return
        state = FlowState(kind=request_kind(req.path), path=req.path, mode=api_flows.mode_of(flow))
        state.t.request = req.timestamp_end or time.time()
        state.attach(flow)
        if o.client_api_key and not client_key_ok(req, o.client_api_key):
            flow.response = error_response(401, "invalid x-api-key for this warmturn proxy")
