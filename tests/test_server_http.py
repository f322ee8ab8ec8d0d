"""The live server (`python -m warmturn.server`, real default model, loopback) driven by the anthropic SDK.

One server subprocess for the whole module: `--decode-concurrency 1 --max-queue 1` so the
queue-full path can be reached, a small `--max-body-bytes` for 413, an API key for 401, the prefix cache on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import anthropic
import httpx
import pytest

from tests import procs
from tests.conftest import FIXTURES, ROOT, free_port
from warmturn.server.blas import OPT_OUT, preload_plan

pytestmark = pytest.mark.model

KEY = "test-key-123"
MAX_BODY = 200_000
CC = FIXTURES / "claude_code"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    log_file = tmp_path_factory.mktemp("server") / "server.log"
    flags = ["--model", str(model_dir), "--api-key", KEY, "--decode-concurrency", "1", "--max-queue", "1",
             "--max-body-bytes", str(MAX_BODY), "--log-file", str(log_file), "--cache-bytes", str(256 << 20)]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the server arranges OpenBLAS itself
    env.pop(OPT_OUT, None)
    with procs.server(*flags, log=log_file.with_suffix(".out"), env=env) as (proc, base):
        yield {"base": base, "log": log_file, "proc": proc}


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server["base"], api_key=KEY, max_retries=0, timeout=120)


def raw(server, method, path, **kw):
    headers = {"x-api-key": KEY, **kw.pop("headers", {})}
    return httpx.request(method, server["base"] + path, headers=headers, timeout=120, **kw)


def sse_events(text: str) -> list[dict]:
    events = []
    for chunk in text.split("\n\n"):
        lines = chunk.strip().splitlines()
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), chunk
        ev = json.loads(lines[1][len("data: "):])
        assert ev["type"] == lines[0][len("event: "):]
        events.append(ev)
    return events


def wait_idle(server, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = raw(server, "GET", "/health").json()
        if not h["busy"] and h["queue_depth"] == 0:
            return h
        time.sleep(0.2)
    pytest.fail("server stayed busy")


HELLO = [{"role": "user", "content": "Say hello."}]


def test_root_and_health_answer_without_credentials(server):
    head = httpx.head(server["base"] + "/")
    assert head.status_code == 200 and head.headers["request-id"].startswith("req_")
    assert httpx.get(server["base"] + "/").status_code == 200
    health = httpx.get(server["base"] + "/health").json()
    assert health["status"] == "ok" and health["model"]


def test_non_streaming_message(client):
    msg = client.messages.create(model="claude-opus-4-8", max_tokens=6, messages=HELLO)
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.model == "claude-opus-4-8"  # the requested name is echoed
    assert msg.id.startswith("msg_")
    assert msg.content and msg.content[0].type == "text"
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= msg.usage.output_tokens <= 6
    u = msg.usage
    assert u.input_tokens >= 1 and u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens > 10
    assert msg._request_id and msg._request_id.startswith("req_")


def test_streaming_through_the_sdk_helpers_and_count_tokens(client):
    system = "You are a terse assistant."
    counted = client.messages.count_tokens(model="claude-haiku-4-5-20251001", system=system, messages=HELLO)
    with client.messages.stream(model="claude-haiku-4-5-20251001", max_tokens=8, system=system,
                                messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.output_tokens >= 1
    # count_tokens goes through the same rendering: the whole prompt is accounted for
    u = final.usage
    assert counted.input_tokens == u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    assert final.usage.input_tokens > 0  # a zero here breaks Claude Code's context meter


def test_stream_event_sequence_is_anthropics(server):
    body = {"model": "m", "max_tokens": 5, "stream": True, "messages": HELLO}
    r = raw(server, "POST", "/v1/messages?beta=true", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["request-id"].startswith("req_")
    events = sse_events(r.text)
    types = [e["type"] for e in events]
    assert types[:3] == ["message_start", "ping", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[3:-3]) <= {"content_block_delta"}
    usage = events[0]["message"]["usage"]
    assert usage["input_tokens"] > 0 and {"cache_read_input_tokens", "cache_creation_input_tokens"} <= usage.keys()
    assert events[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert events[-2]["usage"]["output_tokens"] >= 1


def test_repeated_prompt_is_served_from_the_prefix_cache(client):
    messages = [{"role": "user", "content": "List three colors, please."}]
    system = "You answer in one short line. " * 20
    client.messages.create(model="m", max_tokens=2, system=system, messages=messages)
    again = client.messages.create(model="m", max_tokens=2, system=system, messages=messages)
    assert again.usage.cache_read_input_tokens > 100
    assert again.usage.input_tokens >= 1  # at least the last token is computed


def test_stop_sequence_cuts_the_live_output(client):
    messages = [{"role": "user", "content": "Name five fruits."}]
    free = client.messages.create(model="m", max_tokens=12, messages=messages, extra_body={"temperature": 0})
    text = free.content[0].text
    words = text.split()
    assert len(words) >= 4, text
    stop = words[2]
    cut = client.messages.create(model="m", max_tokens=12, messages=messages, stop_sequences=[stop],
                                 extra_body={"temperature": 0})
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]
    assert cut.usage.output_tokens < free.usage.output_tokens


def test_claude_code_tool_round_is_accepted(server):
    lines = (CC / "tool_round.jsonl").read_text().splitlines()
    body = [json.loads(line)["body"] for line in lines if json.loads(line)["body"]][1]  # carries a tool_result
    assert any(b.get("type") == "tool_result" for m in body["messages"] if isinstance(m["content"], list)
               for b in m["content"])
    body = dict(body, max_tokens=3)
    r = raw(server, "POST", "/v1/messages?beta=true", json=body)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"


def test_models_list_and_retrieve(client, server):
    page = client.models.list()
    ids = [m.id for m in page.data]
    served = raw(server, "GET", "/health").json()["model"]
    assert ids[0] == served and "claude-opus-4-8" in ids and "claude-haiku-4-5-20251001" in ids
    two = client.models.list(limit=2)
    assert [m.id for m in two.data] == ids[:2] and two.has_more
    nxt = client.models.list(limit=2, after_id=ids[1])
    assert [m.id for m in nxt.data] == ids[2:4]
    assert client.models.retrieve("claude-opus-4-8").id == "claude-opus-4-8"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("mlx-community/Some-Model-8bit")  # ids may contain slashes: routed, then 404


def assert_error(r: httpx.Response, status: int, etype: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == etype and body["error"]["message"]
    assert body["request_id"] == r.headers["request-id"]
    return body


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"model": "m", "messages": HELLO}).encode(), "max_tokens: Field required"),
        (json.dumps({"model": "m", "max_tokens": 5}).encode(), "messages: Field required"),
        (json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}).encode(),
         "no vision"),
    ],
)
def test_400_invalid_requests(server, content, fragment):
    r = raw(server, "POST", "/v1/messages", content=content, headers={"content-type": "application/json"})
    assert fragment in assert_error(r, 400, "invalid_request_error")["error"]["message"]


def test_400_over_context_refused_before_prefill(server, client):
    body = json.loads((CC / "full_first_turn.json").read_text())["body"]
    before = raw(server, "GET", "/metrics").text
    r = raw(server, "POST", "/v1/messages?beta=true", json=body)
    msg = assert_error(r, 400, "invalid_request_error")["error"]["message"]
    assert "prompt is too long" in msg and "8191 maximum" in msg and "8192" in msg
    assert "README.md, section 'Prompt is too long'" in msg  # where the user finds what to do
    n = int(msg.split("prompt is too long: ")[1].split(" tokens")[0])
    counted = client.messages.count_tokens(model=body["model"], system=body["system"], messages=body["messages"],
                                           tools=body["tools"])
    assert counted.input_tokens == n > 8192  # the count still answers, with the same number
    prefill = [line for line in raw(server, "GET", "/metrics").text.splitlines()
               if line.startswith("warmturn_prefill_tokens_total")]
    assert prefill == [line for line in before.splitlines() if line.startswith("warmturn_prefill_tokens_total")]


def test_401_bad_or_missing_key(server):
    bad = anthropic.Anthropic(base_url=server["base"], api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="m", max_tokens=2, messages=HELLO)
    assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(server["base"] + "/v1/messages/count_tokens", json={"model": "m", "messages": HELLO})
    assert_error(r, 401, "authentication_error")
    r = httpx.get(server["base"] + "/v1/models", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


def test_404_413_405(server):
    assert_error(raw(server, "GET", "/v1/nothing-here"), 404, "not_found_error")
    big = json.dumps({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    assert_error(raw(server, "POST", "/v1/messages", content=big, headers={"content-type": "application/json"}),
                 413, "request_too_large")
    assert_error(raw(server, "GET", "/v1/messages"), 405, "invalid_request_error")


LONG = [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread, "
                                    "with many chapters and details."}]


def test_529_when_the_queue_is_full_then_a_cancelled_stream_leaves_the_server_healthy(server, client):
    wait_idle(server)
    with client.messages.stream(model="m", max_tokens=400, messages=LONG) as running:
        for ev in running:
            if ev.type == "content_block_delta":
                break  # A is generating now
        waiting: dict = {}

        def queued():
            waiting["r"] = raw(server, "POST", "/v1/messages",
                               json={"model": "m", "max_tokens": 3, "messages": HELLO})

        t = threading.Thread(target=queued)
        t.start()
        deadline = time.monotonic() + 30
        while raw(server, "GET", "/health").json()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "second request never queued"
            time.sleep(0.05)
        with pytest.raises(anthropic.APIStatusError) as e:
            client.messages.create(model="m", max_tokens=2, messages=HELLO)
        assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"
        assert int(e.value.response.headers["retry-after"]) >= 1
        # count_tokens only tokenizes: it answers while the worker is busy and the queue is full
        assert client.messages.count_tokens(model="m", messages=LONG).input_tokens > 10
        assert raw(server, "GET", "/health").json()["busy"] is True
    # leaving the `with` closed A's connection mid-generation: the server cancels it
    t.join(120)
    assert waiting["r"].status_code == 200 and waiting["r"].json()["type"] == "message"
    wait_idle(server, timeout=30)
    after = client.messages.create(model="m", max_tokens=3, messages=HELLO)
    assert after.usage.output_tokens >= 1
    log_lines = [json.loads(line.split("warmturn.requests: ", 1)[1]) for line in server["log"].read_text().splitlines()
                 if "warmturn.requests: " in line]
    assert any(rec["outcome"] == "cancelled" and rec["output_tokens"] < 400 for rec in log_lines)


def test_non_streaming_client_that_goes_away_cancels_its_generation(server):
    wait_idle(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["base"] + "/v1/messages", headers={"x-api-key": KEY}, timeout=httpx.Timeout(60, read=2.0),
                   json={"model": "gone-client", "max_tokens": 400, "messages": LONG})
    wait_idle(server, timeout=30)
    recs = [json.loads(line.split("warmturn.requests: ", 1)[1]) for line in server["log"].read_text().splitlines()
            if "warmturn.requests: " in line]
    gone = [r for r in recs if r["model"] == "gone-client"]
    assert len(gone) == 1 and gone[0]["outcome"] in ("cancelled", "client_gone")
    assert gone[0].get("output_tokens", 0) < 400


def test_metrics_and_request_log(server):
    text = raw(server, "GET", "/metrics").text
    assert "# TYPE warmturn_requests_total counter" in text
    assert 'warmturn_requests_total{endpoint="messages",status="200"}' in text
    assert "warmturn_queue_depth 0" in text
    assert "warmturn_ttft_seconds_count" in text and "warmturn_generated_tokens_total" in text
    assert "warmturn_cache_hits" in text  # the prefix cache's own stats()
    mlx = {k: float(v) for k, v in re.findall(r"^warmturn_mlx_(\w+)_bytes (\S+)$", text, re.M)}
    assert set(mlx) == {"active", "cache", "peak"} and mlx["active"] > 1e8  # the model's weights at least
    assert mlx["peak"] >= mlx["active"]
    log = server["log"].read_text()
    assert "BLAS: OpenBLAS" in log  # the server re-exec'd itself with OpenBLAS preloaded
    recs = [json.loads(line.split("warmturn.requests: ", 1)[1]) for line in log.splitlines()
            if "warmturn.requests: " in line]
    assert recs and all({"request_id", "prompt_tokens", "reused", "prefill_ms", "ttft_ms"} <= r.keys()
                        for r in recs if r["outcome"] != "client_gone")


def test_non_loopback_bind_without_key_is_refused():
    r = subprocess.run([sys.executable, "-m", "warmturn.server", "--host", "0.0.0.0", "--port", str(free_port())],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--api-key" in r.stderr


@pytest.mark.parametrize(
    "env,platform,cpu,lib,expected",
    [
        ({}, "linux", True, "/x/libblas.so.3", "/x/libblas.so.3"),
        ({"LD_PRELOAD": "/y.so"}, "linux", True, "/x/libblas.so.3", "/x/libblas.so.3:/y.so"),
        ({"LD_PRELOAD": "/x/openblas/libblas.so.3"}, "linux", True, "/x/libblas.so.3", None),
        ({OPT_OUT: "1"}, "linux", True, "/x/libblas.so.3", None),
        ({}, "darwin", True, "/x/libblas.so.3", None),
        ({}, "linux", False, "/x/libblas.so.3", None),
        ({}, "linux", True, None, None),
        ({"WARMTURN_BLAS_REEXEC": "1"}, "linux", True, "/x/libblas.so.3", None),
    ],
)
def test_openblas_preload_plan(env, platform, cpu, lib, expected):
    assert preload_plan(env, platform, cpu, lib) == expected



# --------------------------------------------------------------------------- the engine, in process


def run_engine(engine, tokens, *, on_piece=None, **kw):
    """Submit one request and collect what the worker emits (Prefilled, Pieces, Done or an exception)."""
    from warmturn.server.engine import Admitted, Done, GenerationRequest, Piece

    items: list = []
    finished = threading.Event()
    holder: dict = {}

    def emit(item):
        if isinstance(item, Admitted):  # the cache lookup's item: the tests below start at Prefilled
            return
        items.append(item)
        if isinstance(item, Piece) and on_piece is not None:
            on_piece(holder["req"], item)
        if isinstance(item, (Done, Exception)):
            finished.set()

    req = GenerationRequest(tokens=list(tokens), emit=emit, **{"max_tokens": 8, "temperature": 0.0, **kw})
    holder["req"] = req
    engine.submit(req)
    assert finished.wait(180), "engine never finished the request"
    return items


@pytest.fixture(scope="module")
def engine_parts(model_and_tokenizer):
    from warmturn.server.render import Renderer

    model, tokenizer = model_and_tokenizer
    rendered = Renderer(tokenizer).render(parse_request(LONG, system="You are a storyteller. " * 10))
    return model, tokenizer, rendered


def parse_request(messages, **kw):
    from warmturn.server.wire import parse_messages_request

    return parse_messages_request({"model": "m", "max_tokens": 8, "messages": messages, **kw})


@pytest.fixture()
def engine(engine_parts):
    from warmturn.server.engine import Engine

    model, tokenizer, _ = engine_parts
    eng = Engine(model, tokenizer, None, max_queue=2)
    eng.start()
    yield eng
    eng.stop()


def text_of(items):
    from warmturn.server.engine import Piece

    return "".join(i.text for i in items if isinstance(i, Piece))


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_engine_stops_within_one_token(engine, engine_parts, how):
    from warmturn.server.engine import Done, Prefilled

    def stop_at_three(req, piece):
        if piece.output_tokens == 3:
            if how == "cancel":
                req.cancel.set()
            else:
                req.deadline = 0.0

    items = run_engine(engine, engine_parts[2].tokens, on_piece=stop_at_three, max_tokens=200)
    assert isinstance(items[0], Prefilled)
    done = items[-1]
    assert isinstance(done, Done)
    assert done.reason == ("cancelled" if how == "cancel" else "timeout")
    assert done.output_tokens == 3


def test_engine_failure_goes_down_the_request_queue_and_the_worker_survives(engine_parts):
    from warmturn.server.engine import Done, Engine

    class FailingStore:
        """Fails on purpose: the real PrefixCache cannot be made to fail on demand."""

        stateful = False

        def take(self, tokens):
            raise RuntimeError("store exploded")

        def store(self, tokens, kv, checkpoints=(), *, owned=False):
            return 0

        def stats(self):
            return {}

    model, tokenizer, rendered = engine_parts
    eng = Engine(model, tokenizer, FailingStore())
    eng.start()
    try:
        items = run_engine(eng, rendered.tokens)
        assert isinstance(items[-1], RuntimeError) and "store exploded" in str(items[-1])
        eng.store = None
        assert isinstance(run_engine(eng, rendered.tokens, max_tokens=2)[-1], Done)
    finally:
        eng.stop()


def test_engine_queue_is_bounded():
    from warmturn.server.engine import Engine, GenerationRequest, Overloaded

    eng = Engine(None, None, max_queue=1)  # never started: nothing is consumed
    eng.submit(GenerationRequest(tokens=[1, 2], max_tokens=1, emit=lambda item: None))
    with pytest.raises(Overloaded):
        eng.submit(GenerationRequest(tokens=[1, 2], max_tokens=1, emit=lambda item: None))
    assert eng.depth == 1


def test_engine_with_prefix_cache_warm_equals_cold(engine_parts, engine):
    """The engine <-> store contract: a warm run reuses the prefix and yields the same tokens."""
    from warmturn.server.cache import PrefixCache
    from warmturn.server.engine import Engine, Prefilled

    model, tokenizer, rendered = engine_parts
    cold = run_engine(engine, rendered.tokens)  # no store at all
    eng = Engine(model, tokenizer, PrefixCache(model, max_bytes=256 << 20))
    eng.start()
    try:
        first = run_engine(eng, rendered.tokens, prefix_len=rendered.prefix_len)
        warm = run_engine(eng, rendered.tokens, prefix_len=rendered.prefix_len)
    finally:
        eng.stop()
    assert isinstance(first[0], Prefilled) and first[0].reused == 0 and first[0].created > 0
    assert isinstance(warm[0], Prefilled) and warm[0].reused == len(rendered.tokens) - 1
    assert text_of(cold) == text_of(first) == text_of(warm) != ""


def test_failure_after_the_stream_began_is_an_error_event(engine_parts):
    """A generation that fails mid-stream ends the SSE stream with Anthropic's `error` event,
    which names no internals; the worker survives and the next request is served."""
    from warmturn.server.engine import Engine
    from warmturn.server.http import ServerState
    from warmturn.server.render import Renderer
    from warmturn.server.toolcalls import HERMES

    model, tokenizer, _ = engine_parts

    class BreakingModel:
        """The real model, made to fail on its second decode step, on purpose: the real model
        cannot be made to fail on demand (a mock only where no real part can fail)."""

        def __init__(self):
            self.layers = model.layers
            self.decode_calls = 0
            self.armed = True

        def __call__(self, inputs, cache=None, **kw):
            if self.armed and inputs.shape[1] == 1:
                self.decode_calls += 1
                if self.decode_calls == 2:
                    self.armed = False
                    raise RuntimeError("kv broke")
            return model(inputs, cache=cache, **kw)

    engine = Engine(BreakingModel(), tokenizer, None)
    state = ServerState(engine=engine, renderer=Renderer(tokenizer), model_id="x", context_length=8192,
                        tool_format=HERMES)
    engine.start()
    with serve_in_thread(state) as port:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/messages", timeout=60,
                           json={"model": "m", "max_tokens": 4, "stream": True, "messages": HELLO})
            assert r.status_code == 200
            events = sse_events(r.text)
            assert [e["type"] for e in events[:2]] == ["message_start", "ping"]
            assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
            # the bug's own text stays in the server log; the client gets the request id
            assert "kv broke" not in events[-1]["error"]["message"]
            assert r.headers["request-id"] in events[-1]["error"]["message"]
            assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
            again = httpx.post(f"http://127.0.0.1:{port}/v1/messages", timeout=60,
                               json={"model": "m", "max_tokens": 2, "messages": HELLO})
            assert again.status_code == 200 and again.json()["usage"]["output_tokens"] >= 1
        finally:
            engine.stop()


def test_time_limit_while_queued_is_a_504(engine_parts):
    from warmturn.server.engine import Engine
    from warmturn.server.http import ServerState
    from warmturn.server.render import Renderer
    from warmturn.server.toolcalls import HERMES

    model, tokenizer, _ = engine_parts
    engine = Engine(model, tokenizer, None)  # never started: the request can only wait in the queue
    state = ServerState(engine=engine, renderer=Renderer(tokenizer), model_id="x", context_length=8192,
                        tool_format=HERMES, request_timeout=0.2)
    with serve_in_thread(state) as port:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/messages", timeout=60,
                       json={"model": "m", "max_tokens": 4, "messages": HELLO})
    assert_error(r, 504, "timeout_error")
    assert engine.depth == 0  # it was queued, and withdrawn: its slot is free at once


@contextlib.contextmanager
def live_server(model_and_tokenizer, renderer, api_key: str, max_queue: int):
    """The real engine (no prefix cache) and the app on uvicorn in this process, greedy unless asked, Hermes
    tool calls: yields {"base", "state", "port"}; the engine is stopped on the way out."""
    from warmturn.server.engine import Engine
    from warmturn.server.http import ServerState
    from warmturn.server.toolcalls import HERMES

    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, None, max_queue=max_queue)
    state = ServerState(engine=engine, renderer=renderer, model_id="smol", context_length=8192,
                        tool_format=HERMES, api_key=api_key, default_temperature=0.0)
    engine.start()
    try:
        with serve_in_thread(state) as port:
            yield {"base": f"http://127.0.0.1:{port}", "state": state, "port": port}
    finally:
        engine.stop()


@contextlib.contextmanager
def serve_in_thread(state):
    """The app on uvicorn in a thread of this process (for engines the test builds itself)."""
    import uvicorn

    from warmturn.server.http import make_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline, "in-process server did not start"
            time.sleep(0.05)
        yield port
    finally:
        srv.should_exit = True
        thread.join(10)


def test_engine_stop_cancels_the_running_and_the_queued(engine_parts):
    from warmturn.server.engine import Done, Engine, GenerationRequest, Piece, ShuttingDown

    model, tokenizer, rendered = engine_parts
    eng = Engine(model, tokenizer, None, max_queue=2, decode_concurrency=1)  # the second one waits
    running_items: list = []
    queued_items: list = []
    generating = threading.Event()

    def emit_running(item):
        running_items.append(item)
        if isinstance(item, Piece):
            generating.set()

    eng.start()
    eng.submit(GenerationRequest(tokens=rendered.tokens, max_tokens=500, emit=emit_running, temperature=0.0))
    eng.submit(GenerationRequest(tokens=rendered.tokens, max_tokens=5, emit=queued_items.append))
    assert generating.wait(120)
    eng.stop()
    assert isinstance(running_items[-1], Done) and running_items[-1].reason == "cancelled"
    assert running_items[-1].output_tokens < 500
    # the queued one never started: a ShuttingDown (503, retryable), not a "time limit" 504
    assert len(queued_items) == 1 and isinstance(queued_items[0], ShuttingDown), queued_items
    with pytest.raises(ShuttingDown):  # a stopped engine refuses new work until started again
        eng.submit(GenerationRequest(tokens=rendered.tokens, max_tokens=5, emit=queued_items.append))


def test_a_client_that_leaves_while_queued_frees_its_slot(engine_parts):
    from warmturn.server.engine import Engine
    from warmturn.server.http import ServerState
    from warmturn.server.render import Renderer
    from warmturn.server.toolcalls import HERMES

    model, tokenizer, _ = engine_parts
    engine = Engine(model, tokenizer, None, max_queue=1)  # never started: a request can only wait
    state = ServerState(engine=engine, renderer=Renderer(tokenizer), model_id="x", context_length=8192,
                        tool_format=HERMES)
    with serve_in_thread(state) as port:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/v1/messages", timeout=httpx.Timeout(30, read=1.0),
                       json={"model": "m", "max_tokens": 4, "messages": HELLO})
        deadline = time.monotonic() + 30
        while engine.depth:  # the handler notices the disconnect and withdraws the request
            assert time.monotonic() < deadline, "the queue slot was never freed"
            time.sleep(0.05)
        # the slot is free: the next request is queued, not refused with 529
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/v1/messages", timeout=httpx.Timeout(30, read=1.0),
                       json={"model": "m", "max_tokens": 4, "messages": HELLO})


def test_health_reports_a_dead_worker(engine_parts):
    from warmturn.server.engine import Engine
    from warmturn.server.http import ServerState
    from warmturn.server.render import Renderer
    from warmturn.server.toolcalls import HERMES

    model, tokenizer, _ = engine_parts
    engine = Engine(model, None)  # no tokenizer: the worker thread dies as it starts (a real crash)
    state = ServerState(engine=engine, renderer=Renderer(tokenizer), model_id="x", context_length=8192,
                        tool_format=HERMES)
    engine.start()
    engine._thread.join(30)
    with serve_in_thread(state) as port:
        r = httpx.get(f"http://127.0.0.1:{port}/health")
        assert_error(r, 503, "api_error")
        assert "worker" in r.json()["error"]["message"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/messages", timeout=30,
                       json={"model": "m", "max_tokens": 4, "messages": HELLO})
        assert_error(r, 503, "api_error")
        assert "worker_alive 0.0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
