"""Who is asking and what for: Claude Code's session and agent ids, the billing block, the request kind.

Standard library only (see warmturn/protocol/__init__.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# --------------------------------------------------------------------------- client identity

SESSION_HEADER = "x-claude-code-session-id"
AGENT_HEADER = "x-claude-code-agent-id"
_LEGACY_SESSION = re.compile(r"session_([0-9a-f-]{8,})")


def session_id(headers: Mapping[str, str] | None, body: Any) -> str | None:
    """Claude Code's session id: its ``X-Claude-Code-Session-Id`` header, else the ``session_id`` in
    ``metadata.user_id`` (a JSON string; older clients wrote ``user_…_session_<uuid>``).

    ``headers`` must look names up case-insensitively or hold lower-case names.
    """
    sid = (headers or {}).get(SESSION_HEADER)
    if sid:
        return sid
    if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
        return None
    uid = body["metadata"].get("user_id")
    if not isinstance(uid, str):
        return None
    try:
        data = json.loads(uid)
    except ValueError:
        m = _LEGACY_SESSION.search(uid)
        return m.group(1) if m else None
    sid = data.get("session_id") if isinstance(data, dict) else None
    return sid if isinstance(sid, str) else None


def agent_id(headers: Mapping[str, str] | None) -> str | None:
    """The subagent id header Claude Code sends on a subagent's requests."""
    return (headers or {}).get(AGENT_HEADER) or None


BILLING_PREFIX = "x-anthropic-billing-header:"


@dataclass(frozen=True)
class BillingInfo:
    """What the billing block (if any) said about a request."""

    present: bool = False
    is_subagent: bool = False
    fields: Mapping[str, str] = field(default_factory=dict)


def parse_billing(text: str) -> BillingInfo:
    """Parse ``x-anthropic-billing-header: k=v; k=v;`` (any field set)."""
    idx = text.find(BILLING_PREFIX)
    if idx < 0:
        return BillingInfo()
    line = text[idx + len(BILLING_PREFIX):].split("\n", 1)[0]
    fields = {}
    for part in line.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k:
            fields[k] = v
    return BillingInfo(True, fields.get("cc_is_subagent") == "true", fields)


def find_billing(body: Any) -> BillingInfo:
    """The billing info of a Messages request body (``system`` as a string or text blocks)."""
    system = body.get("system") if isinstance(body, dict) else None
    if isinstance(system, str):
        return parse_billing(system)
    if isinstance(system, list):
        for block in system:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                info = parse_billing(block["text"])
                if info.present:
                    return info
    return BillingInfo()


def is_subagent(headers: Mapping[str, str] | None, body: Any) -> bool:
    """A subagent's request: the agent id header, or ``cc_is_subagent=true`` in the billing block."""
    return bool(agent_id(headers)) or find_billing(body).is_subagent



# --------------------------------------------------------------------------- request kind


def side_request(headers: Mapping[str, str] | None, body: Any) -> str | None:
    """The kind of a Messages request that is no conversation turn, or None for a turn.

    ``title``: Claude Code's conversation-title request (beside the first interactive turn): structured
    output (``output_config.format``, a JSON schema) and no tools. Otherwise, in first-party mode, the
    ``x-claude-code-request-class`` header when it names something other than ``main``.
    """
    if isinstance(body, dict):
        out = body.get("output_config")
        if isinstance(out, dict) and isinstance(out.get("format"), dict) and not body.get("tools"):
            return "title"
    cls = (headers or {}).get("x-claude-code-request-class")
    return cls if cls and cls != "main" else None

RequestKind = Literal["messages", "count_tokens", "models", "other"]


def request_kind(path: str, body: Any = None) -> RequestKind:
    """What an API request is, from its path (query ignored). A body with ``messages`` and no
    path at all (a bare request body) counts as ``messages``."""
    p = path.split("?", 1)[0].rstrip("/")
    if p.endswith("/messages/count_tokens"):
        return "count_tokens"
    if p.endswith("/messages"):
        return "messages"
    if p.endswith("/models") or "/models/" in p:
        return "models"
    if not p and isinstance(body, dict) and "messages" in body:
        return "messages"
    return "other"
