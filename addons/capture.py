"""Capture records (docs/capture-format.md, schema 1): redaction, record building, JSONL append.

Records are built from a flow and the plain-data state the addon keeps in
`flow.metadata["warmturn"]`, so finished flows (e.g. loaded into mitmweb) can be exported
the same way as live ones.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from mitmproxy import http

SCHEMA = 1
REDACTED = "<redacted>"
SECRET_NAMES = frozenset({"x-api-key", "authorization", "proxy-authorization", "cookie", "set-cookie"})
BODY_TEXT_LIMIT = 64 * 1024
META = "warmturn"


def redact_headers(headers: http.Headers | None) -> dict[str, str]:
    """Headers as a dict (multi-valued joined with ", "), credential values redacted."""
    out: dict[str, str] = {}
    if headers is None:
        return out
    for name in headers.keys():
        lname = name.lower()
        if lname in SECRET_NAMES:
            out[lname] = REDACTED
        else:
            out[lname] = ", ".join(headers.get_all(name))
    return out


def redact_json(obj: Any) -> Any:
    """A copy of a JSON value with credential-named keys' values redacted (any depth)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and k.lower() in SECRET_NAMES else redact_json(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_json(v) for v in obj]
    return obj


def redact_stripped(entries: list[dict]) -> list[dict]:
    out = []
    for e in entries:
        if e.get("kind") == "header" and str(e.get("name", "")).lower() in SECRET_NAMES:
            e = {**e, "value": REDACTED}
        out.append(e)
    return out


def _ms(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a) * 1000.0, 3)


def build_record(flow: http.HTTPFlow, label: str | None = None) -> dict[str, Any]:
    """The capture record of a flow the addon handled (state in flow.metadata["warmturn"])."""
    st: dict[str, Any] = flow.metadata.get(META) or {}
    req = flow.request
    t = dict(st.get("t") or {})
    for key in ("request", "sent", "response_headers", "first_byte", "first_content", "end"):
        t.setdefault(key, None)
    if t["request"] is None:
        t["request"] = req.timestamp_end or req.timestamp_start
    if t["end"] is None and flow.response is not None:
        t["end"] = flow.response.timestamp_end
    body_info: dict[str, Any] = {"headers": redact_headers(req.headers)}
    if "body" in st:
        body_info["body"] = redact_json(st["body"])
        if st["body"] is None:
            body_info["body_text"] = st.get("body_text")
    else:
        raw = req.get_content(strict=False) if req.raw_content is not None else b""
        try:
            body_info["body"] = redact_json(json.loads(raw)) if raw else None
        except ValueError:
            body_info["body"] = None
        if body_info["body"] is None:
            body_info["body_text"] = (raw or b"")[:BODY_TEXT_LIMIT].decode("utf-8", "replace")
    resp = flow.response
    error = st.get("error")
    if error is None and flow.error is not None:
        error = {"type": "proxy_error", "message": flow.error.msg}
    client = flow.client_conn.peername
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "id": flow.id,
        "kind": st.get("kind", "other"),
        "label": label if label else None,
        "method": req.method,
        "path": st.get("path", req.path),
        "client": f"{client[0]}:{client[1]}" if client else None,
        "mode": st.get("mode"),
        "backend": st.get("backend"),
        "backend_api": st.get("backend_api"),
        "upstream": st.get("upstream", req.url),
        "normalize": bool(st.get("normalize", False)),
        "session_id": st.get("session_id"),
        "agent_id": st.get("agent_id"),
        "is_subagent": bool(st.get("is_subagent", False)),
        "model": st.get("model"),
        "stream": bool(st.get("stream", False)),
        "status": resp.status_code if resp is not None else None,
        "error": error,
        "t": t,
        "ttfb_ms": _ms(t["request"], t["first_byte"]),
        "ttft_ms": _ms(t["request"], t["first_content"]),
        "total_ms": _ms(t["request"], t["end"]),
        "usage": st.get("usage") or None,
        "stop_reason": st.get("stop_reason"),
        "prefix_hash": st.get("prefix_hash"),
        "prefix_chars": st.get("prefix_chars"),
        "stripped": redact_stripped(st.get("stripped") or []),
        "sizes": {
            "request_original": st.get("size_original", len(req.raw_content or b"")),
            "request_forwarded": st.get("size_forwarded", len(req.raw_content or b"")),
            "response": st.get("size_response", len(resp.raw_content or b"") if resp is not None else 0),
        },
        "request": body_info,
        "response": (
            {"headers": redact_headers(resp.headers), "content": st.get("content")} if resp is not None else None
        ),
    }
    return rec


def expand_path(template: str, when: datetime.datetime | None = None) -> str:
    """`{date}` in the capture_file option becomes YYYYMMDD (local date of the write)."""
    when = when or datetime.datetime.now()
    return os.path.expanduser(template.replace("{date}", when.strftime("%Y%m%d")))


def append_record(path: str, record: dict[str, Any]) -> None:
    """Append one JSONL line with a single write() on an O_APPEND descriptor."""
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode("utf-8")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
