"""Capture: one JSONL record per API flow (docs/capture-format.md, schema 1).

Records are built from a flow and its :class:`~addons.state.FlowState` (live, or the plain data
left on a finished flow), so flows loaded into mitmweb are exported the same way as live ones
(command ``warmturn.export``). ``capture_file`` follows mitmproxy's ``save_stream_file``
convention: strftime() codes in the path (``{date}`` is kept as a synonym of ``%Y%m%d``), a
new file whenever the formatted path changes, missing directories created.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import mitmproxy.types
from mitmproxy import command, ctx, exceptions, flow, http
from mitmproxy.log import ALERT

from warmturn.protocol import REDACTED, is_secret_name, redact_headers, redact_json, redact_url_passwords

from .scrub import redact_query
from .state import FlowState

logger = logging.getLogger(__name__)

SCHEMA = 1
BODY_TEXT_LIMIT = 64 * 1024
MAX_BODY_DEFAULT = 4 * 1024 * 1024  # capture_max_body: larger request bodies are not stored whole


def _ms(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a) * 1000.0, 3)


def _headers(headers: http.Headers | None) -> dict[str, str]:
    return redact_headers(headers.items(multi=True) if headers is not None else None)


_FORM_PAIR = re.compile(r"(?<![A-Za-z0-9_.\-])([A-Za-z0-9_.\-]{1,200}+)=([^&\s]*+)")
_JSON_PAIR = re.compile(r'"((?:[^"\\]|\\.){1,200}+)"(\s*+:\s*+)("(?:[^"\\]|\\.)*+"|[^,{}\[\]\s"]++)')


def redact_text(text: str, content_type: str = "") -> str:
    """A body kept as text (not JSON, too deep or too big to parse): every ``name=value`` form
    field and every ``"name": value`` pair whose name looks like a credential is redacted,
    whatever the content type says. The patterns are possessive (no backtracking): linear time
    on any text, e.g. 10,000 brackets in a row, since this runs on mitmproxy's event loop."""
    text = redact_url_passwords(_FORM_PAIR.sub(lambda m: f"{m[1]}={REDACTED}" if is_secret_name(m[1]) else m[0], text))
    return _JSON_PAIR.sub(lambda m: f'"{m[1]}"{m[2]}"{REDACTED}"' if is_secret_name(m[1]) else m[0], text)


def _body_info(req: http.Request, st: FlowState, max_body: int) -> dict[str, Any]:
    """The request's headers and body (JSON, else text) for the record, redacted and capped: a
    body over `max_body` bytes keeps only its first BODY_TEXT_LIMIT bytes, and ``truncated``
    says how long it was."""
    info: dict[str, Any] = {"headers": _headers(req.headers)}
    raw = req.get_content(strict=False) if req.raw_content is not None else b""
    raw = raw or b""
    size = st.size_original if st.size_original is not None else len(raw)
    if size > max_body or len(raw) > max_body:
        info["body"] = None
        info["body_text"] = redact_text(raw[:BODY_TEXT_LIMIT].decode("utf-8", "replace"),
                                        req.headers.get("content-type", ""))
        info["truncated"] = {"original_bytes": max(size, len(raw)),
                             "kept_bytes": len(info["body_text"].encode("utf-8"))}
        return info
    try:
        if st.translated_from is not None:
            info["body"] = redact_json(st.translated_from)
        else:
            info["body"] = redact_json(json.loads(raw)) if raw else None
    except (ValueError, RecursionError):  # not JSON, or nested too deep to walk
        info["body"] = None
    if info["body"] is None:
        text = raw[:BODY_TEXT_LIMIT].decode("utf-8", "replace")
        info["body_text"] = redact_text(text, req.headers.get("content-type", ""))
        if len(raw) > BODY_TEXT_LIMIT:
            info["truncated"] = {"original_bytes": len(raw), "kept_bytes": len(info["body_text"].encode("utf-8"))}
    return info


def build_record(flow: http.HTTPFlow, label: str | None = None, max_body: int = MAX_BODY_DEFAULT) -> dict[str, Any]:
    """The capture record of a flow (any HTTP flow: one warmturn did not admit gets defaults)."""
    admitted = FlowState.of(flow)
    st = admitted or FlowState()
    req = flow.request
    t = dict(vars(st.t))
    if t["request"] is None:
        t["request"] = req.timestamp_end or req.timestamp_start
    if t["end"] is None and flow.response is not None:
        t["end"] = flow.response.timestamp_end
    body_info = _body_info(req, st, max_body)
    resp = flow.response
    error = st.error
    if error is None and flow.error is not None:
        error = {"type": "proxy_error", "message": flow.error.msg}
    client = flow.client_conn.peername
    return {
        "schema": SCHEMA,
        "id": flow.id,
        "kind": st.kind,
        "label": label or None,
        "method": req.method,
        "path": redact_query(st.path if admitted else req.path),
        "client": f"{client[0]}:{client[1]}" if client else None,
        "mode": st.mode if admitted else None,
        "backend": st.backend if admitted else None,
        "backend_api": st.backend_api if admitted else None,
        "upstream": redact_query(st.upstream or req.url),
        "normalize": st.normalize,
        "session_id": st.session_id,
        "agent_id": st.agent_id,
        "is_subagent": st.is_subagent,
        "model": st.model,
        "stream": st.stream,
        "status": resp.status_code if resp is not None else None,
        "error": error,
        "t": t,
        "ttfb_ms": _ms(t["request"], t["first_byte"]),
        "ttft_ms": _ms(t["request"], t["first_content"]),
        "total_ms": _ms(t["request"], t["end"]),
        "queue_ms": st.queue_ms,
        "side": st.side,
        "prefill_ms": st.prefill_ms,
        "usage": st.usage or None,
        "stop_reason": st.stop_reason,
        "prefix_hash": st.prefix_hash,
        "prefix_chars": st.prefix_chars,
        "stripped": [e.redacted().to_json() for e in st.stripped],
        "sizes": {
            "request_original": st.size_original if st.size_original is not None else len(req.raw_content or b""),
            "request_forwarded": st.size_forwarded if st.size_forwarded is not None else len(req.raw_content or b""),
            "response": st.size_response if st.size_response is not None else
            (len(resp.raw_content or b"") if resp is not None else 0),
        },
        "request": body_info,
        "response": {"headers": _headers(resp.headers), "content": st.content} if resp is not None else None,
    }


def expand_path(spec: str, when: datetime.datetime | None = None) -> str:
    """The capture path for ``when`` (now): strftime() codes expanded, ``{date}`` = ``%Y%m%d``, ``~`` expanded."""
    when = when or datetime.datetime.now()
    return when.strftime(os.path.expanduser(spec.replace("{date}", "%Y%m%d")))


def encode_line(record: dict[str, Any]) -> bytes:
    """One JSONL line, always valid UTF-8 JSON: a lone surrogate in any string (a client may send
    ``"\\ud800"``) falls back to ASCII escapes; a body nested too deep to encode is replaced
    by its text."""
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str) + "\n").encode()
    except RecursionError:
        request = dict(record.get("request") or {})
        request["body"] = None
        request.setdefault("body_text", "<body nested too deep to store>")
        return encode_line({**record, "request": request})


def _cut_torn_tail(fd: int) -> int:
    """Truncate a file that does not end in a newline back to its last one (a line torn by a
    full disk or a kill mid-write, which the next line would otherwise be glued onto and lost
    with). Returns the file's size after."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - 65536)
        nl = os.pread(fd, end - start, start).rfind(b"\n")
        if nl >= 0:
            end = start + nl + 1
            break
        end = start
    os.ftruncate(fd, end)
    return end


def append_record(path: str, record: dict[str, Any]) -> None:
    """Append one JSONL line on an O_APPEND descriptor (private file, 0600). A short write (a
    signal, a nearly full disk) is continued until the whole line is written; a write that fails
    half-way is cut off again, and a torn last line (an older failure, a kill) is cut before the
    new line goes after it, so every line stays valid JSON once space returns."""
    line = memoryview(encode_line(record))
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        start = _cut_torn_tail(fd)
        try:
            while line:
                written = os.write(fd, line)
                if written <= 0:
                    raise OSError(f"write returned {written}")
                line = line[written:]
        except OSError:
            with contextlib.suppress(OSError):  # best effort: the next append cuts it otherwise
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


class Capture:
    def load(self, loader) -> None:
        loader.add_option("capture_file", str, "captures/warmturn-%Y%m%d.jsonl",
                          "JSONL capture log, one line per API flow (docs/capture-format.md). The path can use "
                          "Python strftime() codes, like save_stream_file ('{date}' is a synonym of %Y%m%d); a new "
                          "file starts whenever the formatted path changes; relative paths are relative to the "
                          "working directory; empty disables.")
        loader.add_option("capture_label", str, "",
                          "Free-form label written into every capture record (e.g. normalize-off).")
        loader.add_option("capture_max_body", int, MAX_BODY_DEFAULT,
                          "Request bodies larger than this many bytes are not stored whole: the record keeps "
                          "their first 64 KiB as text and request.truncated gives the original length.")

    def configure(self, updated: set[str]) -> None:
        if "capture_file" in updated and ctx.options.capture_file:
            try:
                expand_path(ctx.options.capture_file)
            except ValueError as e:
                raise exceptions.OptionsError(f"capture_file: {e}") from e

    def warmturn_describe(self, facts: dict) -> None:
        """:class:`~addons.hooks.DescribeHook`: where captures go (empty: off)."""
        facts["capture_file"] = ctx.options.capture_file

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        state = FlowState.of(flow)
        if state is None or state.captured:
            return
        state.captured = True
        spec = ctx.options.capture_file
        if spec:
            path = expand_path(spec)
            try:
                record = build_record(flow, ctx.options.capture_label, ctx.options.capture_max_body)
            except Exception as e:
                logger.exception("warmturn: cannot build the capture record of flow %s", flow.id)
                record = {"schema": SCHEMA, "id": flow.id, "kind": state.kind, "method": flow.request.method,
                          "status": flow.response.status_code if flow.response is not None else None,
                          "error": {"type": "capture_error", "message": f"record not built: {type(e).__name__}"}}
            try:
                append_record(path, record)
            except OSError as e:
                logger.log(ALERT, "warmturn: cannot write capture %s: %s", path, e)

    @command.command("warmturn.export")
    def export(self, flows: Sequence[flow.Flow], path: mitmproxy.types.Path) -> str:
        """Append the selected HTTP flows to a capture file (docs/capture-format.md); says what it wrote."""
        n = 0
        where = os.path.abspath(os.path.expanduser(str(path)))
        try:
            for fl in flows:
                if isinstance(fl, http.HTTPFlow):
                    append_record(where, build_record(fl, ctx.options.capture_label))
                    n += 1
        except OSError as e:
            raise exceptions.CommandError(f"cannot write {where}: {e}") from e
        skipped = len(flows) - n
        result = f"warmturn.export: appended {n} flow{'s' if n != 1 else ''} to {where}" + (
            f" ({skipped} non-HTTP skipped)" if skipped else "")
        logger.info(result)
        return result
