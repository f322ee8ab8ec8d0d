"""Anthropic's error shapes and the one status -> error type map.

Standard library only (see warmturn/protocol/__init__.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

# --------------------------------------------------------------------------- errors

#: Anthropic's documented status -> error type map. 503 is not one of Anthropic's statuses; a
#: backend (or the embedded server) that answers 503 is temporarily unable to serve, which is
#: what Anthropic's ``overloaded_error`` means to clients (Claude Code retries it and says the
#: API is overloaded), so 503 maps there too.
ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

ErrorType = Literal[
    "invalid_request_error", "authentication_error", "billing_error", "permission_error", "not_found_error",
    "request_too_large", "rate_limit_error", "api_error", "timeout_error", "overloaded_error",
]


class RequestError(ValueError):
    """A request the client must fix: a 400 ``invalid_request_error`` at the HTTP boundary."""

    status = 400
    error_type = "invalid_request_error"


def error_type_for(status: int) -> str:
    """Anthropic's error type for an HTTP status (other 5xx: api_error, other 4xx: invalid_request_error)."""
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(error_type: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}`` (+ ``request_id``)."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def error_for_status(status: int, message: str) -> dict[str, Any]:
    """The error body for an HTTP status, typed by :func:`error_type_for`."""
    return error_body(error_type_for(status), message)


def is_error_body(body: Any) -> bool:
    """True for a decoded body already in Anthropic's error shape."""
    return isinstance(body, dict) and body.get("type") == "error" and isinstance(body.get("error"), dict)
