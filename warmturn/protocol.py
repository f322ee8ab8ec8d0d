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

The normalization rules and their undo live next door in :mod:`warmturn.rules`.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


# --------------------------------------------------------------------------- SSE


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event: its ``event:`` name (None when absent) and its joined ``data:`` lines."""

    event: str | None
    data: str

    def json(self) -> Any:
        """The data decoded as JSON; None when it is empty or not JSON."""
        if not self.data:
            return None
        try:
            return json.loads(self.data)
        except ValueError:
            return None


class SSEDecoder:
    """Feed arbitrary byte chunks; get whole events back.

    Decodes line by line (``\\r\\n``, ``\\n`` or ``\\r``), so an event, a line or a UTF-8
    character may be split across chunks anywhere. Comments (``:``) are skipped; ``id`` and
    ``retry`` fields are ignored (Anthropic sends neither).
    """

    def __init__(self) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        out: list[SSEEvent] = []
        while True:
            i_n = self._buf.find(b"\n")
            i_r = self._buf.find(b"\r")
            if i_n < 0 and i_r < 0:
                break
            if i_r >= 0 and (i_n < 0 or i_r < i_n):
                if i_r == len(self._buf) - 1:
                    break  # maybe the first half of \r\n: wait for more
                end, nxt = i_r, i_r + (2 if self._buf[i_r + 1:i_r + 2] == b"\n" else 1)
            else:
                end, nxt = i_n, i_n + 1
            line = self._buf[:end].decode("utf-8", "replace")
            self._buf = self._buf[nxt:]
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    def flush(self) -> list[SSEEvent]:
        """End of stream: a final unterminated line or event is still delivered."""
        out = self.feed(b"\n") if self._buf else []
        ev = self._line("")
        return out + ([ev] if ev else [])

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if self._event is None and not self._data:
                return None
            ev = SSEEvent(self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def decode_sse(data: bytes) -> list[SSEEvent]:
    """Every event of a complete SSE body."""
    dec = SSEDecoder()
    return dec.feed(data) + dec.flush()


def encode_sse(event: Mapping[str, Any]) -> bytes:
    """One event on Anthropic's wire: ``event: <type>`` and compact JSON ``data:``."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


# --------------------------------------------------------------------------- event builder


def new_id(prefix: str) -> str:
    """``msg_…`` / ``toolu_…`` / ``req_…`` style ids (24 random base32-ish characters)."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZabcdefghijkmnpqrstuvwxyz"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(24))


@dataclass(frozen=True)
class Usage:
    """Prompt-side token accounting of one request (Anthropic's: input excludes cache reads and writes)."""

    input_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    def as_dict(self, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": output_tokens,
        }


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"]


class MessageStream:
    """Builds one assistant message as Anthropic's streaming events and as the final message.

    Call :meth:`start`, then :meth:`text` / :meth:`tool_use` (or :meth:`open_tool` plus
    :meth:`tool_input` for arguments that arrive in pieces) as output arrives, then
    :meth:`finish`. Each returns the event dicts to send (encode them with :func:`encode_sse`);
    :meth:`message` is the non-streaming equivalent. Empty text never opens a block.

    ``usage`` is the prompt-side accounting: a :class:`Usage`, or a plain mapping sent as is
    (with ``output_tokens`` added) for engines that report only some fields.
    """

    def __init__(self, model: str, usage: Usage | Mapping[str, int] | None = None, *,
                 id: str | None = None, make_id: Callable[[str], str] = new_id) -> None:
        self.model = model
        self.usage = usage if usage is not None else Usage(0)
        self._make_id = make_id
        self.id = id or make_id("msg_")
        self._content: list[dict[str, Any]] = []
        self._open: Literal["text", "tool"] | None = None
        self._partial: list[str] = []
        self._started = False
        self._final: dict[str, Any] | None = None

    def _usage(self, output_tokens: int) -> dict[str, int]:
        if isinstance(self.usage, Usage):
            return self.usage.as_dict(output_tokens)
        return {**self.usage, "output_tokens": output_tokens}

    @property
    def started(self) -> bool:
        return self._started

    @property
    def finished(self) -> bool:
        return self._final is not None

    def start(self, *, ping: bool = True) -> list[dict[str, Any]]:
        """``message_start`` (and a ``ping``, as Anthropic sends); nothing when already started."""
        if self._started:
            return []
        self._started = True
        msg = self._skeleton()
        msg["usage"] = self._usage(0)
        return [{"type": "message_start", "message": msg}] + ([{"type": "ping"}] if ping else [])

    def _skeleton(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None}

    def _close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        if self._open == "tool":
            raw = "".join(self._partial)
            try:
                self._content[-1]["input"] = json.loads(raw) if raw else {}
            except ValueError:
                self._content[-1]["input"] = {}
            self._partial = []
        self._open = None
        return [{"type": "content_block_stop", "index": len(self._content) - 1}]

    def _begin(self, kind: Literal["text", "tool"], block: dict[str, Any], shown: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self._content.append(block)
        self._open = kind
        events.append({"type": "content_block_start", "index": len(self._content) - 1, "content_block": shown})
        return events

    def text(self, piece: str) -> list[dict[str, Any]]:
        if not piece:
            return []
        events: list[dict[str, Any]] = []
        if self._open != "text":
            events += self._begin("text", {"type": "text", "text": ""}, {"type": "text", "text": ""})
        self._content[-1]["text"] += piece
        events.append({"type": "content_block_delta", "index": len(self._content) - 1,
                       "delta": {"type": "text_delta", "text": piece}})
        return events

    def open_tool(self, name: str, id: str | None = None) -> list[dict[str, Any]]:
        """Start a ``tool_use`` block whose arguments follow through :meth:`tool_input`."""
        block = {"type": "tool_use", "id": id or self._make_id("toolu_"), "name": name, "input": {}}
        return self._begin("tool", block, dict(block))

    def tool_input(self, partial_json: str) -> list[dict[str, Any]]:
        """One ``input_json_delta`` of the open tool block."""
        if self._open != "tool":
            raise RuntimeError("tool_input() without an open tool block")
        if not partial_json:
            return []
        self._partial.append(partial_json)
        return [{"type": "content_block_delta", "index": len(self._content) - 1,
                 "delta": {"type": "input_json_delta", "partial_json": partial_json}}]

    def tool_use(self, name: str, arguments: dict[str, Any], id: str | None = None) -> list[dict[str, Any]]:
        """A whole ``tool_use`` block: start, its arguments in one delta, stop."""
        events = self.open_tool(name, id)
        events += self.tool_input(json.dumps(arguments, ensure_ascii=False))
        events += self._close()
        self._content[-1]["input"] = arguments
        return events

    @property
    def has_tool_use(self) -> bool:
        return any(b["type"] == "tool_use" for b in self._content)

    def finish(self, stop_reason: str, output_tokens: int = 0, stop_sequence: str | None = None, *,
               usage: Mapping[str, int] | None = None, empty_block: bool = True) -> list[dict[str, Any]]:
        """Close the open block, then ``message_delta`` and ``message_stop``.

        ``usage`` replaces the ``message_delta`` usage (an engine's own final counts);
        ``empty_block`` adds an empty text block when nothing was produced (clients that index
        ``content[0]`` keep working).
        """
        events = self.start() if not self._started else []
        events += self._close()
        if not self._content and empty_block:
            self._content.append({"type": "text", "text": ""})
            events += [{"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                       {"type": "content_block_stop", "index": 0}]
        final_usage = dict(usage) if usage is not None else self._usage(output_tokens)
        self._final = self._skeleton() | {"content": self._content, "stop_reason": stop_reason,
                                          "stop_sequence": stop_sequence, "usage": final_usage}
        events.append({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                       "usage": final_usage})
        events.append({"type": "message_stop"})
        return events

    def error(self, error_type: str, message: str) -> list[dict[str, Any]]:
        """An ``error`` event ending the stream (after ``message_start`` if none was sent)."""
        events = self.start(ping=False) if not self._started else []
        return events + [error_body(error_type, message)]

    def message(self) -> dict[str, Any]:
        if self._final is None:
            raise RuntimeError("message() before finish()")
        return self._final


# --------------------------------------------------------------------------- stream fold


@dataclass
class MessageFold:
    """Folds Anthropic Messages stream events (or a whole response body) into a summary.

    A pure reducer with the semantics of the anthropic SDK's ``accumulate_event``: deltas apply
    only to blocks of their kind, a ``signature_delta`` sets the thinking block's signature
    (it is sent whole, not in pieces), tool input is parsed when its block stops, and usage
    fields merge with the later value winning (absent or null fields keep the earlier one).
    Unlike the SDK it never raises on odd input: a proxy must not break the stream it taps.
    """

    usage: dict[str, int] = field(default_factory=dict)
    stop_reason: str | None = None
    stop_sequence: str | None = None
    content: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    model: str | None = None
    id: str | None = None
    saw_content: bool = False
    _partial_json: dict[int, str] = field(default_factory=dict)

    def add(self, ev: SSEEvent) -> bool:
        """Apply one event; True when it is the stream's first content delta (time to first token)."""
        data = ev.json()
        if not isinstance(data, dict):
            return False
        return self.add_event(data, ev.event)

    def add_event(self, data: Mapping[str, Any], name: str | None = None) -> bool:
        """Apply one decoded event (see :meth:`add`)."""
        kind = data.get("type") or name
        first = False
        if kind == "message_start":
            msg = data.get("message") or {}
            self.model = msg.get("model")
            self.id = msg.get("id")
            self._merge_usage(msg.get("usage"))
        elif kind == "content_block_start":
            idx = self._index(data, len(self.content))
            block = data.get("content_block")
            self._block(idx)
            self.content[idx] = dict(block) if isinstance(block, dict) else {}
        elif kind == "content_block_delta":
            first = not self.saw_content
            self.saw_content = True
            idx = self._index(data, 0)
            block = self._block(idx)
            delta = data.get("delta") or {}
            dt, bt = delta.get("type"), block.get("type")
            if dt == "text_delta" and bt in ("text", None):
                block.setdefault("type", "text")
                block["text"] = block.get("text", "") + str(delta.get("text", ""))
            elif dt == "thinking_delta" and bt in ("thinking", None):
                block.setdefault("type", "thinking")
                block["thinking"] = block.get("thinking", "") + str(delta.get("thinking", ""))
            elif dt == "signature_delta" and bt in ("thinking", None):
                block["signature"] = delta.get("signature", "")
            elif dt == "input_json_delta" and bt in ("tool_use", "server_tool_use", None):
                self._partial_json[idx] = self._partial_json.get(idx, "") + str(delta.get("partial_json", ""))
            elif dt == "citations_delta" and bt in ("text", None):
                block.setdefault("citations", []).append(delta.get("citation"))
        elif kind == "content_block_stop":
            idx = self._index(data, 0)
            if idx in self._partial_json and idx < len(self.content):
                raw = self._partial_json.pop(idx)
                try:
                    self.content[idx]["input"] = json.loads(raw) if raw else {}
                except ValueError:
                    self.content[idx]["input_raw"] = raw
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                self.stop_reason = delta["stop_reason"]
            if "stop_sequence" in delta:
                self.stop_sequence = delta["stop_sequence"]
            self._merge_usage(data.get("usage"))
        elif kind == "error":
            self._set_error(data.get("error"))
        return first

    def add_body(self, body: Any) -> None:
        """A non-streamed Messages response (or error) body."""
        if not isinstance(body, dict):
            return
        if body.get("type") == "error":
            self._set_error(body.get("error"))
            return
        self.model = body.get("model")
        self.id = body.get("id")
        self._merge_usage(body.get("usage"))
        self.stop_reason = body.get("stop_reason")
        self.stop_sequence = body.get("stop_sequence")
        if isinstance(body.get("content"), list):
            self.content = body["content"]

    def add_bytes(self, data: bytes) -> MessageFold:
        """A whole response: a JSON body or an SSE stream. Returns self."""
        if data.lstrip().startswith(b"{"):
            try:
                self.add_body(json.loads(data))
            except ValueError:
                pass
        else:
            for ev in decode_sse(data):
                self.add(ev)
        return self

    @property
    def text(self) -> str:
        """The text blocks joined (what a user reads)."""
        return "".join(b.get("text", "") for b in self.content if b.get("type") == "text")

    def _index(self, data: Mapping[str, Any], default: int) -> int:
        idx = data.get("index", default)
        return idx if isinstance(idx, int) and 0 <= idx < 10_000 else default

    def _block(self, idx: int) -> dict[str, Any]:
        while len(self.content) <= idx:
            self.content.append({})
        return self.content[idx]

    def _set_error(self, err: Any) -> None:
        err = err if isinstance(err, dict) else {}
        self.error = {"type": str(err.get("type", "api_error")), "message": str(err.get("message", ""))}

    def _merge_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for k, v in usage.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    self.usage[k] = v


# --------------------------------------------------------------------------- models

#: Claude model ids that stock clients (Claude Code, the SDKs) ask for; a local backend serves
#: all of them with its one model. Newest first.
CLAUDE_MODELS: tuple[str, ...] = (
    "claude-opus-5-5",
    "claude-opus-4-8",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5",
    "claude-haiku-4-5-20251001",
    "claude-opus-4-1-20250805",
    "claude-sonnet-4-20250514",
    "claude-3-5-haiku-20241022",
)
MODELS_CREATED_AT = "2025-01-01T00:00:00Z"


def is_claude_model(name: str) -> bool:
    """A Claude model id (any ``claude-*`` name: clients learn new ones before we do)."""
    return isinstance(name, str) and name.startswith("claude-")


def model_info(model_id: str, display_name: str | None = None, created_at: str = MODELS_CREATED_AT) -> dict[str, Any]:
    """One entry of ``GET /v1/models``."""
    return {"type": "model", "id": model_id, "display_name": display_name or model_id, "created_at": created_at}


def page_models(models: Sequence[dict[str, Any]], *, limit: int = 20, after_id: str | None = None,
                before_id: str | None = None) -> dict[str, Any]:
    """Anthropic's paginated list shape over ``models`` (in the order given). Raises RequestError."""
    if limit < 1 or limit > 1000:
        raise RequestError("limit: must be between 1 and 1000")
    ids = [m["id"] for m in models]
    lo, hi = 0, len(models)
    if after_id is not None:
        if after_id not in ids:
            raise RequestError(f"after_id: unknown model {after_id!r}")
        lo = ids.index(after_id) + 1
    if before_id is not None:
        if before_id not in ids:
            raise RequestError(f"before_id: unknown model {before_id!r}")
        hi = ids.index(before_id)
    window = list(models[lo:hi])
    page = window[-limit:] if before_id is not None and after_id is None else window[:limit]
    return {"data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(window) > limit}


# --------------------------------------------------------------------------- redaction

REDACTED = "<redacted>"
SECRET_NAMES = frozenset({"x-api-key", "authorization", "proxy-authorization", "cookie", "set-cookie"})
#: name parts that mark a credential wherever they appear (``x-auth-token``, ``api_key``, ``accessToken``…)
SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token", "apikey", "cookie", "credential",
                "authorization", "session", "sessid", "privkey", "privatekey")
#: name parts that mark one only as a whole part (``key`` but not ``keyboard``, ``auth`` but not ``author``)
SECRET_PARTS = frozenset({"key", "auth", "oauth", "pwd", "pass", "sid", "jwt", "bearer", "creds", "cred", "sig",
                          "signature"})
#: names that match but are not credentials: Claude Code's session id is captured as a field anyway;
#: ``signature`` alone is the opaque hash of an Anthropic thinking block (``X-Amz-Signature``,
#: ``Signature`` (AWS v2 query) and ``x-goog-signature`` are credentials)
NOT_SECRET = frozenset({"x-claude-code-session-id", "session_id", "sessionid"})
NOT_SECRET_EXACT = frozenset({"signature"})
#: what a part ``tokens`` counts when it follows one of these (``max_tokens``, ``cache_read_input_tokens``,
#: ``anthropic-ratelimit-tokens-remaining``): a number, not a credential. Any other ``…tokens``
#: (``access_tokens``, ``X-Refresh-Tokens``, ``apiTokens``) is one.
TOKEN_COUNTS = frozenset({
    "max", "min", "input", "output", "prompt", "completion", "total", "budget", "cache", "cached", "reasoning",
    "audio", "text", "image", "prediction", "new", "num", "n", "generated", "prefill", "prefix", "reused",
    "count", "context", "remaining", "used", "created", "read", "ratelimit", "thinking", "response", "request",
})
_NAME_PARTS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def _name_parts(name: str) -> list[str]:
    """``X-Auth-Token`` -> x, auth, token; ``accessToken`` -> access, token; ``API_KEY`` -> api, key."""
    return [p.lower() for p in _NAME_PARTS.findall(name)]


def _a_count(parts: list[str], i: int) -> bool:
    """Whether part ``i`` (ending in "tokens") names a number of tokens: ``tokens`` alone or after
    a counting word (``max_tokens``), or one word like ``maxtokens``."""
    stem = parts[i][: -len("tokens")]
    if stem:
        return stem in TOKEN_COUNTS
    return i == 0 or parts[i - 1] in TOKEN_COUNTS


def is_secret_name(name: str) -> bool:
    """A header, JSON key, form field or query parameter whose value may be a credential and
    never reaches a log or capture: any name with a part such as key, token, secret, auth,
    password, cookie, session, creds, privkey or signature (token counts like ``max_tokens`` and
    ``input_tokens`` excepted, see ``TOKEN_COUNTS``)."""
    low = name.lower()
    if low in SECRET_NAMES:
        return True
    if low in NOT_SECRET or name in NOT_SECRET_EXACT:
        return False
    parts = _name_parts(name)
    for i, part in enumerate(parts):
        if part in SECRET_PARTS:
            return True
        if part.startswith("tokeniz") or (part.endswith("tokens") and _a_count(parts, i)):
            continue  # token counts and tokenizer names
        if any(w in part for w in SECRET_WORDS):
            return True
    return False


#: ``scheme://user:password@host``: the password of a URL with credentials (a ``database_url``)
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]{0,30}+://[^\s/:@\"'<>]{0,200}+:)([^\s/@\"'<>]{1,500}+)(@)")


def redact_url_passwords(text: str) -> str:
    """``postgres://app:hunter2@db/x`` -> ``postgres://app:<redacted>@db/x``, anywhere in `text`.
    Linear time (possessive patterns); a string without ``://`` is returned as it is."""
    if "://" not in text or "@" not in text:
        return text
    return _URL_PASSWORD.sub(lambda m: m[1] + REDACTED + m[3], text)


def _pairs(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    if isinstance(headers, Mapping):
        return headers.items()
    items = getattr(headers, "items", None)
    return items() if callable(items) else headers


def key_matches(headers: Mapping[str, str], api_key: str,
                encode: Callable[[str], bytes] = lambda s: s.encode("utf-8", "surrogateescape")) -> bool | None:
    """None when no credential was sent, else whether x-api-key or the bearer token (either one)
    equals `api_key`, compared in constant time. An empty x-api-key never hides a bearer token.
    `encode` turns a header value back into the bytes that were sent (latin-1 for Starlette's
    headers, utf-8 with surrogateescape for mitmproxy's)."""
    given = [headers.get("x-api-key", "").strip()]
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        given.append(auth[7:].strip())
    given = [g for g in given if g]
    if not given:
        return None
    want = api_key.encode()
    # evaluate every candidate (no short-circuit): timing says nothing about which one matched
    results = [hmac.compare_digest(encode(g), want) for g in given]
    return any(results)


def redact_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> dict[str, str]:
    """Headers as a dict with lower-case names (repeated fields joined with ``, ``), credentials redacted.

    Takes a mapping or ``(name, value)`` pairs (pass mitmproxy's ``headers.items(multi=True)``).
    """
    out: dict[str, str] = {}
    for name, value in _pairs(headers or {}):
        key = str(name).lower()
        value = REDACTED if is_secret_name(key) else redact_url_passwords(str(value))
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def redact_json(obj: Any) -> Any:
    """A copy of a JSON value with credential-named keys' values redacted, at any depth, and the
    passwords of URLs in any string (``"database_url": "postgres://u:pw@h"``)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and is_secret_name(k) else redact_json(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_json(v) for v in obj]
    if isinstance(obj, str):
        return redact_url_passwords(obj)
    return obj


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
