"""Hostile input, round two (issue 21, part 2): the live server with the real default model on
loopback, driven by httpx and the anthropic SDK. Each test here failed before its fix."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.test_server_http import run_engine, serve_in_thread, sse_events

pytestmark = pytest.mark.model

KEY = "k1-hostile"
JSON = {"content-type": "application/json", "x-api-key": KEY}
HELLO = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "Say hi."}]}


@pytest.fixture(scope="module")
def live(model_and_tokenizer):
    from warmturn.server.engine import Engine
    from warmturn.server.http import ServerState
    from warmturn.server.render import Renderer
    from warmturn.server.toolcalls import HERMES

    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, None, max_queue=8)
    state = ServerState(engine=engine, renderer=Renderer(tokenizer), model_id="smol", context_length=8192,
                        tool_format=HERMES, api_key=KEY, default_temperature=0.0)
    engine.start()
    try:
        with serve_in_thread(state) as port:
            yield {"base": f"http://127.0.0.1:{port}", "state": state, "port": port}
    finally:
        engine.stop()


def post(live, body, path="/v1/messages", **kw):
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(live["base"] + path, content=content, headers=JSON, timeout=120, **kw)


def requests_total(live, status: str) -> float:
    text = httpx.get(live["base"] + "/metrics", headers=JSON, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("warmturn_requests_total{") and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- 1. sampler parameters


def test_vocab_size_is_the_logits_width(live, model_and_tokenizer):
    import mlx.core as mx

    model, _ = model_and_tokenizer
    logits = model(mx.array([[1, 2]]))
    assert live["state"].vocab_size == logits.shape[-1] > 0


@pytest.mark.parametrize("top_k", ["vocab", "vocab+1", 10**12])
def test_top_k_at_or_above_the_vocabulary_keeps_every_token_and_sampling_keeps_working(live, top_k):
    vocab = live["state"].vocab_size
    k = {"vocab": vocab, "vocab+1": vocab + 1}.get(top_k, top_k)
    r = post(live, {**HELLO, "temperature": 1.0, "top_k": k})
    assert r.status_code == 200, r.text
    # before the fix: the first request was a 500, and every sampled one after it too
    for body in ({**HELLO, "temperature": 1.0}, {**HELLO, "temperature": 0.7, "top_k": 5, "top_p": 0.9},
                 {**HELLO, "temperature": 1.0, "stream": True}):
        r = post(live, body)
        assert r.status_code == 200, r.text
        if body.get("stream"):
            assert sse_events(r.text)[-1]["type"] == "message_stop"


def test_a_sampler_that_fails_fails_only_its_request(model_and_tokenizer):
    """Past the boundary (a top_k the engine gets unclamped): that request gets its error; the
    process-wide random state is not left broken for the next sampled request."""
    from warmturn.server.engine import Done, Engine
    from warmturn.server.sampling import vocab_size

    model, tokenizer = model_and_tokenizer
    tokens = tokenizer.encode("Once upon a time")
    eng = Engine(model, tokenizer, None, max_queue=2)
    eng.start()
    try:
        items = run_engine(eng, tokens, temperature=1.0, top_k=vocab_size(model), max_tokens=2)
        assert isinstance(items[-1], ValueError) and "top_k" in str(items[-1])
        for _ in range(2):
            items = run_engine(eng, tokens, temperature=1.0, max_tokens=2)
            assert isinstance(items[-1], Done), items[-1]
    finally:
        eng.stop()


def test_clamp_top_k():
    from warmturn.server.sampling import clamp_top_k

    assert [clamp_top_k(k, 100) for k in (None, 0, 1, 99, 100, 101, 10**18)] == [0, 0, 1, 99, 0, 0, 0]
    assert clamp_top_k(10**6, 0) == 10**6  # unknown width: unchanged (the sampler guard still holds)
