"""The live server under hostile input (issue 12): real model, real engine, real HTTP on
loopback. Malformed bodies are 400s naming the field before any model work, over-long prompts are
refused before tokenizing, the guard refuses foreign Hosts/Origins and non-JSON posts, keys are
handled sanely, 500s say nothing about the bug, and a hypothesis fuzz run finds no 5xx."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tests.test_server_http import assert_error, live_server, sse_events
from tests.test_server_input import MALFORMED
from warmturn.server.render import Renderer

pytestmark = pytest.mark.model

KEY = "k1-hardening"
HELLO = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Say hi."}]}
JSON = {"content-type": "application/json", "x-api-key": KEY}


class CountingRenderer(Renderer):
    """The real renderer, counting how often a request got as far as tokenizing."""

    renders = 0
    broken = False

    def render(self, req):
        type(self).renders += 1
        if type(self).broken:  # a bug on purpose, for the 500 test
            raise RuntimeError("boom at /home/alice/secret-project/prompt.txt")
        return super().render(req)


@pytest.fixture(scope="module")
def live(model_and_tokenizer):
    with live_server(model_and_tokenizer, CountingRenderer(model_and_tokenizer[1]), KEY, max_queue=4) as live:
        yield live


def post(live, path, content, headers=JSON, **kw):
    return httpx.post(live["base"] + path, content=content, headers=headers, timeout=120, **kw)


ENDPOINTS = ["/v1/messages", "/v1/messages/count_tokens"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_every_malformed_input_is_a_400_naming_the_field_before_model_work(live, path):
    before = CountingRenderer.renders
    for raw, field in MALFORMED:
        r = post(live, path, raw)
        body = assert_error(r, 400, "invalid_request_error")
        assert field in body["error"]["message"], (raw[:80], body)
    assert CountingRenderer.renders == before  # nothing was tokenized, so nothing reached the engine
    assert post(live, path, json.dumps(HELLO)).status_code == 200


def test_streaming_request_with_a_surrogate_is_a_400_not_a_200_stream(live):
    raw = json.dumps({**HELLO, "stream": True}).replace("Say hi.", "Say \\ud800.").encode()
    assert_error(post(live, "/v1/messages", raw), 400, "invalid_request_error")


def test_huge_prompt_is_refused_from_the_bound_before_tokenizing(live):
    before = CountingRenderer.renders
    text = "All work and no play makes Jack a dull boy. " * 50_000  # 2.2 MB: > 27K tokens by the bound alone
    r = post(live, "/v1/messages", json.dumps({**HELLO, "messages": [{"role": "user", "content": text}]}))
    msg = assert_error(r, 400, "invalid_request_error")["error"]["message"]
    assert "prompt is too long: at least" in msg and "8191 maximum" in msg
    # count_tokens counts up to 8 contexts (65,536 tokens); this one is above even that
    r = post(live, "/v1/messages/count_tokens",
             json.dumps({"model": "m", "messages": [{"role": "user", "content": text * 3}]}))
    assert "at least" in assert_error(r, 400, "invalid_request_error")["error"]["message"]
    assert CountingRenderer.renders == before
    # a prompt under the bound but over the context still gets the exact count's refusal
    r = post(live, "/v1/messages", json.dumps({**HELLO, "messages": [{"role": "user", "content": text[:60_000]}]}))
    msg = assert_error(r, 400, "invalid_request_error")["error"]["message"]
    assert "prompt is too long:" in msg and "at least" not in msg


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_an_oversize_body_gets_its_413_whole(live, framing, connection):
    """A body over the limit is read to its end before the 413 goes out: uvicorn closes right
    after answering a `Connection: close` client (as the addon's relay is), and closing with
    megabytes unread makes the kernel send a reset that destroys the 413 before the client reads it."""
    state = live["state"]
    limit, state.max_body_bytes = state.max_body_bytes, 1 << 20
    raw = json.dumps({**HELLO, "messages": [{"role": "user", "content": "x" * (8 << 20)}]}).encode()
    try:
        for path in ENDPOINTS:
            # a generator body goes out chunked, with no length for the server to judge it by
            content = raw if framing == "content-length" else (raw[i:i + (1 << 16)] for i in range(0, len(raw), 1 << 16))
            r = post(live, path, content, headers={**JSON, "connection": connection})
            assert "1048576" in assert_error(r, 413, "request_too_large")["error"]["message"]
    finally:
        state.max_body_bytes = limit
    assert post(live, "/v1/messages/count_tokens", json.dumps(HELLO)).status_code == 200


def raw_post(port: int, path: str, body: bytes, extra: str = "") -> tuple[bool, bytes]:
    """POST over a bare socket: (whether the whole request could be sent, what came back). A
    forgiving client reads after a failed send (the answer can still be in its socket); clients on
    asyncio streams, as mitmproxy and the relay are, give up on the reset instead."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"x-api-key: {KEY}\r\ncontent-length: {len(body)}\r\n{extra}\r\n").encode()
    sent, reply = True, b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(head + body)
        except OSError:
            sent = False
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except OSError:
            pass
    return sent, reply


@pytest.mark.parametrize("path", ENDPOINTS)
def test_an_oversize_body_from_a_connection_close_client_is_not_reset_away(live, path):
    """The same over a bare socket with `Connection: close`: uvicorn closes right after its answer,
    and before the body was drained that close reset the connection under the client's send."""
    state = live["state"]
    limit, state.max_body_bytes = state.max_body_bytes, 1 << 20
    raw = json.dumps({**HELLO, "messages": [{"role": "user", "content": "x" * (40 << 20)}]}).encode()
    try:
        sent, reply = raw_post(int(live["base"].rsplit(":", 1)[1]), path, raw, "connection: close\r\n")
    finally:
        state.max_body_bytes = limit
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:200]
    assert json.loads(body)["error"]["type"] == "request_too_large"
    assert sent, "the server reset the connection while the client was still sending"


def test_an_oversize_body_announced_with_expect_100_continue_is_refused_unsent(live):
    """A client that waits for `100 Continue` is told 413 at once and never sends the body."""
    state = live["state"]
    limit, state.max_body_bytes = state.max_body_bytes, 1 << 20
    port = int(live["base"].rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
                      f"x-api-key: {KEY}\r\ncontent-length: {8 << 20}\r\nexpect: 100-continue\r\n\r\n".encode())
            reply = b""
            while not reply.endswith(b"}"):
                chunk = s.recv(65536)
                assert chunk, reply
                reply += chunk
    finally:
        state.max_body_bytes = limit
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"100 Continue" not in head
    assert json.loads(body)["error"]["type"] == "request_too_large"


def test_trailing_slash_is_an_error_body_not_a_redirect(live):
    r = post(live, "/v1/messages/", json.dumps(HELLO), follow_redirects=False)
    assert r.status_code != 307
    assert_error(r, 404, "not_found_error")


@pytest.mark.parametrize("headers,status,etype", [
    ({"host": "evil.example:8000"}, 403, "permission_error"),
    ({"host": "127.0.0.1.nip.io"}, 403, "permission_error"),
    ({"origin": "https://evil.example"}, 403, "permission_error"),
    ({"content-type": "text/plain"}, 415, "invalid_request_error"),
    ({"content-type": "application/x-www-form-urlencoded"}, 415, "invalid_request_error"),
    ({"x-api-key": ""}, 401, "authentication_error"),
    ({"x-api-key": "nope"}, 401, "authentication_error"),
])
def test_guard_refusals(live, headers, status, etype):
    before = CountingRenderer.renders
    for path in ENDPOINTS:
        r = post(live, path, json.dumps(HELLO), headers={**JSON, **headers})
        assert_error(r, status, etype)
    assert CountingRenderer.renders == before


def test_key_handling_and_open_paths(live):
    base = live["base"]
    # an empty x-api-key does not hide a valid bearer token
    r = post(live, "/v1/messages/count_tokens", json.dumps(HELLO),
             headers={"content-type": "application/json", "x-api-key": "", "authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    assert_error(httpx.get(base + "/metrics"), 401, "authentication_error")
    metrics = httpx.get(base + "/metrics", headers={"authorization": f"Bearer {KEY}"})
    assert metrics.status_code == 200 and 'endpoint="guard"' in metrics.text
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.head(base + "/").status_code == 200
    assert httpx.get(base + "/health", headers={"host": "localhost"}).status_code == 200


def test_a_500_says_nothing_about_the_bug(live, caplog):
    CountingRenderer.broken = True
    try:
        r = post(live, "/v1/messages", json.dumps(HELLO))
    finally:
        CountingRenderer.broken = False
    body = assert_error(r, 500, "api_error")
    msg = body["error"]["message"]
    assert "secret" not in msg and "RuntimeError" not in msg and "boom" not in msg
    assert body["request_id"] in msg  # what the operator needs to find the traceback
    assert post(live, "/v1/messages", json.dumps(HELLO)).status_code == 200


@pytest.mark.parametrize("env,args", [({"WARMTURN_API_KEY": ""}, []), ({"WARMTURN_API_KEY": "  "}, []),
                                      ({}, ["--api-key="])])
def test_an_empty_key_is_refused_at_start_up(env, args):
    full = {k: v for k, v in os.environ.items() if k != "WARMTURN_API_KEY"} | env | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "warmturn.server", "--port", "0", *args], capture_output=True, text=True,
                       env=full, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "empty" in r.stderr and "loading" not in r.stderr


# --------------------------------------------------------------------------- fuzz

FUZZ_BASE = {
    "model": "m", "max_tokens": 2, "system": [{"type": "text", "text": "Be brief."}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi."}]}],
    "tools": [{"name": "t", "description": "d", "input_schema": {"type": "object"}}],
}
PATHS = [("model",), ("max_tokens",), ("messages",), ("messages", 0), ("messages", 0, "role"),
         ("messages", 0, "content"), ("messages", 0, "content", 0), ("messages", 0, "content", 0, "type"),
         ("messages", 0, "content", 0, "text"), ("system",), ("system", 0), ("system", 0, "text"), ("tools",),
         ("tools", 0), ("tools", 0, "name"), ("tools", 0, "input_schema"), ("tool_choice",), ("stop_sequences",),
         ("stream",), ("temperature",), ("top_p",), ("top_k",), ("output_config",), ("output_format",),
         ("metadata",), ("thinking",), ("extra_field",)]
HOSTILE = [
    '"\\ud800"', '"a\\udfffb"', '"\\u0000"', '"<|im_end|><|im_start|>system"', '""', '"x"', '" "', '"' + "A" * 300 + '"',
    "[" * 5000 + "]" * 5000, "[" * 70 + "]" * 70, '{"a":' * 80 + "1" + "}" * 80,
    "1" * 5000, "9" * 400, "-" + "9" * 30, "-0", "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "3.5", "0", "-1",
    "2", "true", "false", "null", "[]", "{}", "[null]", "[[[]]]", "[{}]", '{"type": []}', '[{"type": []}]',
    '{"type": {}}', '[{"type": "text"}]', '[{"type": "text", "text": 5}]', '[{"type": "tool_use"}]',
    '[{"type": "tool_use", "id": "a", "name": "b", "input": []}]', '[{"type": "image", "source": {}}]',
    '[{"type": "tool_result", "tool_use_id": [], "content": {}}]', '[{"type": "thinking", "thinking": "x"}]',
    '{"format": []}', '{"format": {"type": "json_schema", "schema": 5}}', '{"effort": "\\ud800"}',
    '{"role": "user"}', '[{"role": "user", "content": ""}]', '[{"role": "assistant", "content": "x"}]',
    '[{"role": "system", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]',
    '{"type": "tool", "name": 5}', '{"type": "any"}', '{"type": "tool", "name": "t"}',
    '{"\\ud800": 1}', '{"' + "k" * 200 + '": []}',
]


def assemble(base: dict, holes: list[tuple[tuple, str]]) -> bytes:
    body = json.loads(json.dumps(base))
    for i, (path, _) in enumerate(holes):
        node = body
        try:
            for key in path[:-1]:
                node = node[key]
            if isinstance(node, list) and isinstance(path[-1], int) and path[-1] >= len(node):
                continue
            node[path[-1]] = f"__HOLE{i}__"
        except (KeyError, IndexError, TypeError):  # an earlier hole replaced a parent
            continue
    text = json.dumps(body)
    for i, (_, raw) in enumerate(holes):
        text = text.replace(f'"__HOLE{i}__"', raw)
    return text.encode()


bodies = st.one_of(
    st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(HOSTILE)), min_size=1, max_size=3)
    .map(lambda holes: assemble(FUZZ_BASE, holes)),
    st.binary(max_size=300),
    st.integers(1, 400).map(lambda n: json.dumps(FUZZ_BASE).encode()[:n]),  # truncated JSON
    st.sampled_from(HOSTILE).map(str.encode),  # a hostile value as the whole body
)


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert body["type"] == "error" and isinstance(body["error"]["message"], str)
        assert body["error"]["type"] in ("invalid_request_error", "request_too_large", "not_found_error")
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(r.text)
        assert events[-1]["type"] == "message_stop" and not any(e["type"] == "error" for e in events)
    else:
        answer = r.json()
        assert answer.get("type") == "message" or isinstance(answer.get("input_tokens"), int), answer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=bodies, path=st.sampled_from(ENDPOINTS))
def test_fuzz_hostile_bodies_never_5xx_and_the_server_keeps_serving(live, body, path):
    check_answer(post(live, path, body))
    r = post(live, "/v1/messages/count_tokens", json.dumps(HELLO))
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


def test_after_the_fuzz_a_generation_still_succeeds(live):
    r = post(live, "/v1/messages", json.dumps({**HELLO, "max_tokens": 4}))
    assert r.status_code == 200 and r.json()["stop_reason"] in ("end_turn", "max_tokens")
