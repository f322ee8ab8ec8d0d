"""Group flows into sessions and agents, in request order.

Claude Code names its session in the ``X-Claude-Code-Session-Id`` header (and in
``metadata.user_id``); subagents add ``x-claude-code-agent-id``. Captures without them (raw
request dumps, other clients) fall back to a heuristic: requests whose first user message is
the same belong to the same conversation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from warmturn import protocol


def _first_user_text(body: dict | None) -> str | None:
    for msg in (body or {}).get("messages") or []:
        if isinstance(msg, dict) and msg.get("role") == "user":
            c = msg.get("content")
            if isinstance(c, str):
                return c
            texts = [b.get("text", "") for b in (c or []) if isinstance(b, dict) and b.get("type") == "text"]
            return "".join(texts) if texts else json.dumps(c, sort_keys=True)
    return None


def _text_hash(text: str) -> str:
    """The first 8 hex digits of the text's SHA-256: a short, stable name for a conversation."""
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:8]


def assign_sessions(records: Sequence[dict]) -> None:
    """Set ``session`` and ``agent`` on each record (in place).

    ``session``: the Claude Code session id, else ``conv-<hash of the first user message>``.
    ``agent``: ``main``, the ``x-claude-code-agent-id`` value, or ``sub-<hash>`` for a subagent
    known only from its billing block.
    ``side``: the side-request kind (``title``…, the capture's own or ``warmturn.protocol.side_request``)
    or None: side requests are no turn of any agent.
    """
    for r in records:
        body = r.get("original") or r.get("body")
        first = _first_user_text(body)
        sid = r.get("session_id")
        r["session"] = str(sid) if sid else (f"conv-{_text_hash(first)}" if first is not None else "unknown")
        r["side"] = r.get("side") or protocol.side_request(r.get("original_headers") or r.get("headers"), body)
        if r.get("agent_id"):
            r["agent"] = str(r["agent_id"])
        elif r.get("is_subagent"):
            r["agent"] = f"sub-{_text_hash(first or '')}"
        else:
            r["agent"] = "main"


def order_key(r: dict) -> tuple:
    t = (r.get("t") or {}).get("request")
    return (t if isinstance(t, (int, float)) else float("inf"), r.get("source", ""), r.get("line", 0))


def group(records: Sequence[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """``{(arm, session, agent): [turns in request order]}`` for Messages flows (side requests left out)."""
    msgs = [r for r in records if r.get("kind") == "messages" and isinstance(r.get("body"), dict)]
    assign_sessions(msgs)
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in sorted(msgs, key=order_key):
        if r["side"]:
            continue
        out.setdefault((str(r.get("arm")), r["session"], r["agent"]), []).append(r)
    return out
