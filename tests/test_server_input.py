"""Hostile input on plain data (issue 12, items 4, 5, 14, 15): JSON decoding and request
validation name the field, the Host/Origin/content-type/key guard, and the cheap lower bound on
prompt tokens, checked against the real default tokenizer."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_server_wire import BODIES
from warmturn.server import guard
from warmturn.server.render import Renderer, longest_token_bytes
from warmturn.server.wire import MAX_JSON_DEPTH, RequestError, decode_json, parse_messages_request

BASE = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi."}]}


def with_field(raw_value: str, *path: str | int) -> bytes:
    """BASE as JSON text with the value at `path` replaced by the raw JSON text `raw_value`
    (so values json.dumps cannot produce, like 5000-digit integers or lone surrogates, fit)."""
    marker = "__HOLE__"
    body = json.loads(json.dumps(BASE))
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = marker
    return json.dumps(body).replace(f'"{marker}"', raw_value).encode()


def deep(n: int) -> str:
    return "[" * n + "]" * n


# Every input of the probe that gave a 500, as (raw body, the field the error must name).
MALFORMED = [
    (with_field("9" * 400, "max_tokens"), "max_tokens"),
    (with_field("-" + "9" * 400, "max_tokens"), "max_tokens"),
    (with_field("1" * 5000, "max_tokens"), "max_tokens"),
    (with_field("1" * 5000, "temperature"), "temperature"),
    (with_field("1" * 5000, "metadata"), "metadata"),
    (with_field("1e400", "max_tokens"), "max_tokens"),
    (with_field("1e400", "temperature"), "temperature"),
    (with_field("[" + "1" * 5000 + "]", "top_k"), "top_k.0"),
    (with_field('[{"type": []}]', "messages", 0, "content"), "messages.0.content.0.type"),
    (with_field('[{"type": {}}]', "messages", 0, "content"), "messages.0.content.0.type"),
    (with_field('[{"type": [], "text": "x"}]', "system"), "system.0.type"),
    (with_field('[{"type": "tool_result", "tool_use_id": "t", "content": [{"type": []}]}]', "messages", 0, "content"),
     "messages.0.content.0.content.0.type"),
    (with_field('"effort"', "output_config"), "output_config"),
    (with_field("5", "output_config"), "output_config"),
    (with_field('["a"]', "output_config"), "output_config"),
    (with_field('{"format": "json"}', "output_config"), "output_config.format"),
    (with_field('"x"', "output_format"), "output_format"),
    (with_field('"\\ud800"', "messages", 0, "content"), "messages.0.content"),
    (with_field('[{"type": "text", "text": "a\\udc00b"}]', "messages", 0, "content"), "messages.0.content.0.text"),
    (with_field('"\\ud800"', "system"), "system"),
    (with_field('[{"type": "text", "text": "\\udfff"}]', "system"), "system.0.text"),
    (with_field('"claude-\\ud83d"', "model"), "model"),
    (with_field('[{"name": "t\\ud800", "input_schema": {}}]', "tools"), "tools.0.name"),
    (with_field('{"k\\ud800": 1}', "metadata"), "metadata.<key"),
    (with_field(deep(MAX_JSON_DEPTH + 5), "metadata"), "metadata.0.0"),
    (with_field(deep(5000), "messages", 0, "content"), "nested deeper"),
    (with_field(deep(100_000), "system"), "nested deeper"),
    (with_field("NaN", "temperature"), "NaN"),
    (with_field("Infinity", "max_tokens"), "Infinity"),
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "UTF-8"),
]


@pytest.mark.parametrize("raw,field", MALFORMED, ids=[f"{i}:{f}" for i, (_, f) in enumerate(MALFORMED)])
@pytest.mark.parametrize("count_only", [False, True])
def test_malformed_bodies_are_request_errors_naming_the_field(raw, field, count_only):
    with pytest.raises(RequestError) as e:
        parse_messages_request(decode_json(raw), count_only=count_only)
    assert field in str(e.value)


def test_nesting_up_to_the_limit_is_accepted():
    body = json.loads(json.dumps(BASE))
    inner: object = {}
    for _ in range(MAX_JSON_DEPTH - 2):  # body -> metadata -> ... : exactly MAX_JSON_DEPTH levels
        inner = {"a": inner}
    body["metadata"] = inner
    assert parse_messages_request(decode_json(json.dumps(body).encode())).max_tokens == 8


@pytest.mark.parametrize("name,body", BODIES, ids=[b[0] for b in BODIES])
def test_every_recorded_claude_code_request_decodes(name, body):
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert decode_json(raw) == body
    parse_messages_request(decode_json(raw), count_only="max_tokens" not in body)


def test_big_but_valid_numbers_are_in_range_or_refused_cleanly():
    assert parse_messages_request({**BASE, "max_tokens": 10**18}).max_tokens == 10**18
    for v in (2**63, 1e300, -1, 0):
        with pytest.raises(RequestError, match="max_tokens"):
            parse_messages_request({**BASE, "max_tokens": v})
    assert parse_messages_request({**BASE, "max_tokens": 64.0}).max_tokens == 64


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec=None), max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=30,
))
def test_any_json_value_anywhere_is_accepted_or_a_request_error(value):
    """Any JSON value (surrogates, NaN and huge ints included) at any top-level field: the
    parser answers a MessagesRequest or a RequestError, never another exception."""
    fields = ["model", "messages", "max_tokens", "system", "tools", "tool_choice", "stop_sequences", "stream",
              "temperature", "top_p", "top_k", "output_config", "output_format", "metadata", "thinking"]
    rng = random.Random(json.dumps(value, default=str))
    key = rng.choice(fields)
    body = {**BASE, key: value}
    try:
        raw = json.dumps(body).encode()
    except ValueError:
        return
    for count_only in (False, True):
        try:
            parse_messages_request(decode_json(raw), count_only=count_only)
        except RequestError:
            pass


# --------------------------------------------------------------------------- guard


NAMES = guard.allowed_host_names("127.0.0.1", ["box.lan"])


@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("LOCALHOST", True), ("[::1]:8000", True),
    ("127.0.0.2:8000", True), ("[::ffff:127.0.0.1]:8000", True), ("box.lan:8000", True),
    ("evil.example:8000", False), ("127.0.0.1.nip.io:8000", False), ("localhost.evil.example", False),
    ("10.0.0.5:8000", False), ("", False),
    ("127.1:8000", True), ("2130706433", True), ("127.0.0.1 evil.example", False),  # machine.canonical_ip
])
def test_host_header_must_name_this_server(host, ok):
    r = guard.check("GET", "/v1/models", {"host": host}, names=NAMES, bind_host="127.0.0.1", api_key=None)
    assert (r is None) == ok
    if not ok:
        assert (r.status, r.error_type) == (403, "permission_error")


def test_wildcard_bind_accepts_ip_literals_but_not_foreign_names():
    names = guard.allowed_host_names("0.0.0.0")
    assert guard.host_allowed("192.168.1.7", names, "0.0.0.0")
    assert not guard.host_allowed("evil.example", names, "0.0.0.0")
    assert guard.host_allowed("anything", guard.allowed_host_names("127.0.0.1", ["*"]), "127.0.0.1")


@pytest.mark.parametrize("origin,ok", [
    ("http://127.0.0.1:3000", True), ("http://localhost", True), ("https://evil.example", False),
    ("null", False), ("file://", False),
])
def test_browser_origins_of_other_sites_are_refused(origin, ok):
    r = guard.check("POST", "/v1/messages", {"host": "127.0.0.1:8000", "origin": origin,
                                              "content-type": "application/json"},
                    names=NAMES, bind_host="127.0.0.1", api_key=None)
    assert (r is None) == ok


@pytest.mark.parametrize("ctype,ok", [
    ("application/json", True), ("Application/JSON; charset=utf-8", True), (None, False),
    ("text/plain", False), ("application/x-www-form-urlencoded", False), ("multipart/form-data; boundary=x", False),
])
def test_api_posts_need_a_json_content_type(ctype, ok):
    headers = {"host": "127.0.0.1"} | ({"content-type": ctype} if ctype else {})
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = guard.check("POST", path, headers, names=NAMES, bind_host="127.0.0.1", api_key=None)
        assert (r is None) == ok and (ok or (r.status, r.error_type) == (415, "invalid_request_error"))


@pytest.mark.parametrize("headers,verdict", [
    ({"x-api-key": "k1"}, True),
    ({"authorization": "Bearer k1"}, True),
    ({"authorization": "bearer  k1 "}, True),
    ({"x-api-key": "", "authorization": "Bearer k1"}, True),  # an empty x-api-key hides nothing
    ({"x-api-key": "wrong", "authorization": "Bearer k1"}, True),
    ({"x-api-key": "k1", "authorization": "Bearer wrong"}, True),
    ({"x-api-key": "wrong"}, False),
    ({"x-api-key": "k1x"}, False),
    ({"x-api-key": ""}, None),
    ({"authorization": "Basic azE="}, None),
    ({}, None),
])
def test_either_credential_header_may_carry_the_key(headers, verdict):
    assert guard.key_matches(headers, "k1") is verdict


@pytest.mark.parametrize("path,needs_key", [
    ("/", False), ("/health", False), ("/metrics", True), ("/v1/models", True), ("/v1/messages", True),
])
def test_which_paths_need_the_key(path, needs_key):
    r = guard.check("GET", path, {"host": "127.0.0.1"}, names=NAMES, bind_host="127.0.0.1", api_key="k1")
    assert (r is not None and r.status == 401) == needs_key


# --------------------------------------------------------------------------- the cheap token bound


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from mlx_lm.tokenizer_utils import load

    return load(model_dir)


def test_longest_token_is_derived_from_the_vocabulary(tokenizer):
    longest = longest_token_bytes(tokenizer)
    vocab = json.loads(tokenizer._tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    assert longest == max(len(t) for t in vocab) == 81  # SmolLM2: 80 spaces after a newline
    # every single token decodes to at most that many bytes
    for i in range(0, len(vocab), 97):
        assert len(tokenizer.decode([i]).encode()) <= longest


def test_no_bound_for_a_tokenizer_that_normalizes(tokenizer, tmp_path):
    """A normalizer can shrink text (NFKC turns 3-byte characters into 1 byte): no bound then."""
    from tokenizers import Tokenizer, normalizers

    t = Tokenizer.from_str(tokenizer._tokenizer.backend_tokenizer.to_str())
    t.normalizer = normalizers.NFKC()

    class Wrapped:
        backend_tokenizer = t

    assert longest_token_bytes(Wrapped()) is None


TEXTS = [
    "Hello world. " * 50,
    "\n" + " " * 80 + "x" * 3,  # the longest token itself
    "a" + ("\n" + " " * 80) * 40 + "b",  # nearly all longest tokens: the bound is tight here
    "<|im_start|><|im_end|>" * 30,  # special-token text inside user content
    "日本語のテキスト🙂" * 40,
    "0123456789" * 40,
    "".join(chr(random.Random(7).randrange(32, 0x2FFF)) for _ in range(2000)),
]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_min_tokens_never_exceeds_the_real_count(tokenizer, text):
    renderer = Renderer(tokenizer)
    req = parse_messages_request({**BASE, "system": text[:500], "messages": [
        {"role": "user", "content": text},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": text}]},
    ]}, count_only=True)
    floor = renderer.min_tokens(req)
    real = len(renderer.render(req).tokens)
    assert floor <= real
    assert floor > 0 or len(text.strip().encode()) < 81


def test_min_tokens_is_tight_on_the_worst_case(tokenizer):
    renderer = Renderer(tokenizer)
    text = ("\n" + " " * 80) * 400
    req = parse_messages_request({**BASE, "messages": [{"role": "user", "content": "x" + text + "x"}]})
    assert renderer.min_tokens(req) >= 0.9 * len(renderer.encode(text))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(codec="utf-8"), max_size=400))
def test_min_tokens_bound_holds_for_any_text(tokenizer, text):
    renderer = Renderer(tokenizer)
    req = parse_messages_request({**BASE, "messages": [{"role": "user", "content": text * 3}]})
    assert renderer.min_tokens(req) <= len(renderer.render(req).tokens)
