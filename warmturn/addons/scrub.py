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

import urllib.parse

from mitmproxy import http

from warmturn.protocol import REDACTED, is_secret_name


def redact_query(url_or_path: str) -> str:
    """A path or URL with the values of credential-named query parameters redacted (the one
    implementation: the flow's URL here, the capture's ``path`` and ``upstream``). Without such a
    parameter it is returned byte for byte as it was."""
    head, sep, query = url_or_path.partition("?")
    if not sep:
        return url_or_path
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if not any(is_secret_name(k) for k, _ in pairs):
        return url_or_path
    return head + "?" + urllib.parse.urlencode([(k, REDACTED if is_secret_name(k) else v) for k, v in pairs])


def scrub_query(request: http.Request) -> bool:
    """Redact the values of credential-named query parameters in the request's path, in place;
    True if any was."""
    path = redact_query(request.path)
    if path == request.path:
        return False
    request.path = path
    return True


class Scrub:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        scrub_query(flow.request)

    def response(self, flow: http.HTTPFlow) -> None:
        scrub_query(flow.request)

    def error(self, flow: http.HTTPFlow) -> None:
        scrub_query(flow.request)
