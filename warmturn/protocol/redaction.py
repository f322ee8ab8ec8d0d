"""Credentials: secret header and field names, redaction, the one constant-time key check.

Standard library only (see warmturn/protocol/__init__.py).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

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
