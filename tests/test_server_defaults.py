"""Safe defaults when the bundled default model is served: greedy unless the request sets a temperature,
and an output cap that ends a turn honestly (stop_reason max_tokens). Other models keep Anthropic's defaults."""

from __future__ import annotations

import httpx
import pytest

from tests.test_server_http import serve_in_thread, sse_events
from warmturn.server.__main__ import DEFAULT_MODEL_OUTPUT_CAP, make_parser, sampling_defaults

CLAUDE_CODE_LIKE = {"model": "claude-opus-5-5", "max_tokens": 128000, "stream": True,  # what Claude Code sends
                    "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}


@pytest.mark.parametrize("argv, expected", [
    ([], (0.0, DEFAULT_MODEL_OUTPUT_CAP)),                     # the bundled default model
    (["--model", "/models/big"], (1.0, 0)),                    # any other model: Anthropic's defaults, no cap
    (["--default-temperature", "0.7"], (0.7, DEFAULT_MODEL_OUTPUT_CAP)),
    (["--max-output-tokens", "0"], (0.0, 0)),
    (["--model", "/models/big", "--default-temperature", "0", "--max-output-tokens", "2048"], (0.0, 2048)),
])
def test_sampling_defaults(argv, expected):
    assert sampling_defaults(make_parser().parse_args(argv)) == expected


@pytest.fixture(scope="module")
def capped(model_and_tokenizer):
    """The app in this process with the default model's profile: greedy by default, output cap 5."""
    from warmturn.server.engine import Engine
    from warmturn.server.http import ServerState
    from warmturn.server.render import Renderer
    from warmturn.server.toolcalls import HERMES

    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, None)
    state = ServerState(engine=engine, renderer=Renderer(tokenizer), model_id="smol", context_length=8192,
                        tool_format=HERMES, default_temperature=0.0, max_output_tokens=5)
    engine.start()
    try:
        with serve_in_thread(state) as port:
            yield f"http://127.0.0.1:{port}"
    finally:
        engine.stop()


@pytest.mark.model
def test_the_cap_ends_a_128000_token_request_with_stop_reason_max_tokens(capped):
    r = httpx.post(capped + "/v1/messages", json=CLAUDE_CODE_LIKE, timeout=120)
    assert r.status_code == 200
    delta = [e for e in sse_events(r.text) if e["type"] == "message_delta"][-1]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"]["output_tokens"] == 5
    health = httpx.get(capped + "/health").json()
    assert health["context_length"] == 8192 and health["max_output_tokens"] == 5


@pytest.mark.model
def test_requests_without_temperature_decode_greedily(capped):
    body = {**CLAUDE_CODE_LIKE, "stream": False}
    texts = {httpx.post(capped + "/v1/messages", json=body, timeout=120).json()["content"][0]["text"]
             for _ in range(3)}
    assert len(texts) == 1, texts  # at temperature 1 three 5-token continuations of a story differ
    hot = {httpx.post(capped + "/v1/messages", json={**body, "temperature": 1.0}, timeout=120).json()["content"][0]["text"]
           for _ in range(4)}
    assert len(hot) > 1, hot  # a request that sets its temperature still gets it
