"""Anthropic's Messages wire protocol, written once. Standard library only.

Everything here is pure: no sockets, no HTTP framework, no mitmproxy, no MLX. The addon
(`addons/`, which may import only the standard library and mitmproxy), the server (`server/`),
the analysis (`analysis/`) and the bench (`bench/`) all import it, so each concept below has
exactly one implementation:

========================  =====================================================
SSE decoding              :class:`SSEDecoder` (incremental, chunk-split safe), :func:`decode_sse`
SSE encoding              :func:`encode_sse`
event builder             :class:`MessageStream` (the events of one assistant message)
stream fold               :class:`MessageFold` (like the SDK's ``accumulate_event``)
errors                    :func:`error_type_for` (the one status -> type map), :func:`error_body`
model names               :data:`CLAUDE_MODELS`, :func:`model_info`, :func:`page_models`
header redaction          :func:`redact_headers`, :func:`redact_json`, :func:`is_secret_name`
client identity           :func:`session_id`, :func:`agent_id`, :func:`is_subagent`
billing block             :func:`parse_billing`, :func:`find_billing`
request kind              :func:`request_kind`
========================  =====================================================

One module a concept: ``errors``, ``sse``, ``stream`` (MessageStream, Usage), ``fold``,
``models``, ``redaction``, ``client`` (identity, billing block, request kind); import from
``warmturn.protocol`` itself. The normalization rules and their undo live next door in
:mod:`warmturn.rules`.
"""

from __future__ import annotations

from warmturn.protocol.client import (
    AGENT_HEADER,
    BILLING_PREFIX,
    SESSION_HEADER,
    BillingInfo,
    RequestKind,
    agent_id,
    find_billing,
    is_subagent,
    parse_billing,
    request_kind,
    session_id,
    side_request,
)
from warmturn.protocol.errors import (
    ERROR_TYPES,
    ErrorType,
    RequestError,
    error_body,
    error_for_status,
    error_type_for,
    is_error_body,
)
from warmturn.protocol.fold import (
    MessageFold,
)
from warmturn.protocol.models import (
    CLAUDE_MODELS,
    MODELS_CREATED_AT,
    is_claude_model,
    model_info,
    page_models,
)
from warmturn.protocol.redaction import (
    NOT_SECRET,
    NOT_SECRET_EXACT,
    REDACTED,
    SECRET_NAMES,
    SECRET_PARTS,
    SECRET_WORDS,
    TOKEN_COUNTS,
    is_secret_name,
    key_matches,
    redact_headers,
    redact_json,
    redact_url_passwords,
)
from warmturn.protocol.sse import (
    SSEDecoder,
    SSEEvent,
    decode_sse,
    encode_sse,
)
from warmturn.protocol.stream import (
    MessageStream,
    StopReason,
    Usage,
    new_id,
)

__all__ = [
    "AGENT_HEADER",
    "BILLING_PREFIX",
    "CLAUDE_MODELS",
    "ERROR_TYPES",
    "MODELS_CREATED_AT",
    "NOT_SECRET",
    "NOT_SECRET_EXACT",
    "REDACTED",
    "SECRET_NAMES",
    "SECRET_PARTS",
    "SECRET_WORDS",
    "SESSION_HEADER",
    "TOKEN_COUNTS",
    "BillingInfo",
    "ErrorType",
    "MessageFold",
    "MessageStream",
    "RequestError",
    "RequestKind",
    "SSEDecoder",
    "SSEEvent",
    "StopReason",
    "Usage",
    "agent_id",
    "decode_sse",
    "encode_sse",
    "error_body",
    "error_for_status",
    "error_type_for",
    "find_billing",
    "is_claude_model",
    "is_error_body",
    "is_secret_name",
    "is_subagent",
    "key_matches",
    "model_info",
    "new_id",
    "page_models",
    "parse_billing",
    "redact_headers",
    "redact_json",
    "redact_url_passwords",
    "request_kind",
    "session_id",
    "side_request",
]
