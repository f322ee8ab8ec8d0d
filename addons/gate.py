"""Gate: who may use the proxy, and which flows are warmturn's.

Refuses non-loopback clients unless ``allow_remote`` (CONNECT tunnels included), admits API
flows by attaching their :class:`~addons.state.FlowState`, and checks ``client_api_key``.
Everything else passes through untouched.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, http

from warmturn.plumbing import is_loopback
from warmturn.protocol import request_kind

from . import routing
from .backends import error_response
from .state import FlowState

logger = logging.getLogger(__name__)


def is_remote(flow: http.HTTPFlow) -> bool:
    """The client is not on this machine's loopback."""
    peer = flow.client_conn.peername
    return bool(peer) and not is_loopback(peer[0])


def client_key_ok(req: http.Request, key: str) -> bool:
    if req.headers.get("x-api-key") == key:
        return True
    auth = req.headers.get("authorization", "")
    return auth.lower().startswith("bearer ") and auth[7:].strip() == key


class Gate:
    def load(self, loader) -> None:
        loader.add_option("allow_remote", bool, False,
                          "Serve non-loopback clients. Off by default: others get 403 permission_error.")
        loader.add_option("client_api_key", str, "",
                          "If set, API requests must carry this key (x-api-key or Authorization: Bearer), "
                          "else 401 authentication_error.")

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not ctx.options.allow_remote and is_remote(flow):
            flow.response = http.Response.make(403, b"warmturn serves loopback clients only")

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        o = ctx.options
        if not o.allow_remote and is_remote(flow):
            logger.warning("warmturn: refused non-loopback client %s (set allow_remote=true to serve it)",
                           flow.client_conn.peername[0])
            flow.response = error_response(403, "warmturn serves loopback clients only (addon option allow_remote)")
            return
        if not routing.is_api_flow(flow):
            return
        req = flow.request
        state = FlowState(kind=request_kind(req.path), path=req.path, mode=routing.mode_of(flow),
                          backend=o.backend.strip(), backend_api=o.backend_api, normalize=o.normalize)
        state.t.request = req.timestamp_end or time.time()
        state.attach(flow)
        if o.client_api_key and not client_key_ok(req, o.client_api_key):
            flow.response = error_response(401, "invalid x-api-key for this warmturn proxy")
