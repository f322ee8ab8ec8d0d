"""Scrub: once a request has gone upstream, the values of credential-named query parameters
(``?api_key=…``, ``?access_token=…``: :func:`warmturn.protocol.is_secret_name`) are redacted in the
flow's URL, so that what mitmproxy shows of the flow afterwards never holds them: mitmdump's own
flow line (its Dumper runs after script addons), mitmweb's finished flows, exports and saved flows.

The backend still receives the URL unchanged: the hooks below run only once the request line
is on the wire. A flow still in flight shows its URL as sent (mitmweb lists flows from their
request). Every HTTP flow is scrubbed, not only API flows: a credential in a URL is one whatever
the destination.
"""

from __future__ import annotations

from mitmproxy import http

from warmturn.protocol import REDACTED, is_secret_name


def scrub_query(request: http.Request) -> bool:
    """Redact the values of credential-named query parameters in place; True if any was. Other
    URLs are left byte for byte as they were."""
    if "?" not in request.path:
        return False
    pairs = request.query.items(multi=True)
    if not any(is_secret_name(k) for k, _ in pairs):
        return False
    request.query = [(k, REDACTED if is_secret_name(k) else v) for k, v in pairs]
    return True


class Scrub:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        scrub_query(flow.request)

    def response(self, flow: http.HTTPFlow) -> None:
        scrub_query(flow.request)

    def error(self, flow: http.HTTPFlow) -> None:
        scrub_query(flow.request)
