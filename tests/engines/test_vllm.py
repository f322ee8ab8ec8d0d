"""A real vLLM behind a real `mitmdump -s addons/normalize.py`, driven by the official anthropic SDK.

Both of vLLM's APIs are covered: its native Messages API (`backend_api=anthropic`) and Chat Completions
(`backend_api=openai`, the addon translating). The prefix-cache numbers come from vLLM's own /metrics.
"""

from __future__ import annotations

import uuid
from contextlib import ExitStack

import anthropic
import httpx
import pytest

from tests.conftest import free_port
from tests.engines.engine_parts import VLLM_MODEL, prefix_cache_counters
from tests.procs import BILLING, mitmdump, read_capture

APIS = ["anthropic", "openai"]
CLAUDE = "claude-opus-4-8"
WEATHER = {"name": "get_weather", "description": "Current weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# ~40 lines of stable instructions: several of vLLM's 128-token prefix-cache blocks.
STABLE = "You are a careful assistant for a software project.\n" + "\n".join(
    f"Rule {i}: keep answers short, name files exactly, and never invent APIs." for i in range(1, 41))
# A per-request line vLLM does not know (it strips only Claude Code's billing block), at the very
# start of the system prompt, where it defeats every cached block after it.
NONCE_FRAGMENT = r"request-nonce: [0-9a-f]{32}\n"


@pytest.fixture(scope="module")
def proxies(vllm_url, tmp_path_factory):
    """mitmdump in front of vLLM, per backend_api: normalize on (with the nonce fragment pattern) and off."""
    tmp = tmp_path_factory.mktemp("mitm")
    out = {}
    with ExitStack() as stack:
        for api in APIS:
            for normalize in (True, False):
                port = free_port()
                name = f"{api}-{'on' if normalize else 'off'}"
                stack.enter_context(mitmdump(
                    port, tmp / f"{name}.log", backend=vllm_url, backend_api=api, backend_model=VLLM_MODEL,
                    normalize=normalize, capture_file=tmp / f"{name}.jsonl",
                    volatile_fragments=[r"x-anthropic-billing-header:[^\n]*\n?", NONCE_FRAGMENT]))
                out[(api, normalize)] = (f"http://127.0.0.1:{port}", tmp / f"{name}.jsonl")
        yield out


def client_for(proxies, api: str, normalize: bool = True) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxies[(api, normalize)][0], api_key="not-a-key", max_retries=0,
                               timeout=600)


@pytest.mark.parametrize("api", APIS)
def test_streamed_text_reaches_the_client_complete(proxies, api):
    client = client_for(proxies, api)
    with client.messages.stream(model=CLAUDE, max_tokens=12, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "What is the capital of France?"}]) as s:
        text = "".join(s.text_stream)
        msg = s.get_final_message()
    assert "Paris" in text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    # the usage arrives in message_delta (anthropic) or vLLM's separate `"choices": []` chunk (openai):
    # either way the client must see it, not 0/0
    assert msg.usage.input_tokens > 10 and msg.usage.output_tokens > 0


@pytest.mark.parametrize("api", APIS)
def test_streamed_tool_call(proxies, api):
    client = client_for(proxies, api)
    with client.messages.stream(model=CLAUDE, max_tokens=40, extra_body={"temperature": 0}, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "What is the weather in Paris?"}]) as s:
        events = [e.type for e in s]
        msg = s.get_final_message()
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(calls[0].input, dict) and isinstance(calls[0].input.get("city"), str)
    assert "input_json" in events and events[-1] == "message_stop"


@pytest.mark.parametrize("api", APIS)
def test_count_tokens_with_a_claude_model_name(proxies, vllm_url, api):
    """The client's claude-* name is mapped on count_tokens too (vLLM answers 404 to it)."""
    client = client_for(proxies, api)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    got = client.messages.count_tokens(model=CLAUDE, system=STABLE, messages=messages)
    direct = httpx.post(f"{vllm_url}/v1/messages/count_tokens", timeout=60,
                        json={"model": VLLM_MODEL, "system": STABLE, "messages": messages}).json()
    assert got.input_tokens == direct["input_tokens"] > 300


@pytest.mark.parametrize("api", APIS)
def test_backend_error_arrives_in_anthropics_shape(proxies, api):
    client = client_for(proxies, api)
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=CLAUDE, max_tokens=100_000,
                               messages=[{"role": "user", "content": "Hi"}])
    body = exc.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_model_len" in body["error"]["message"]  # vLLM's own words reach the client


@pytest.mark.parametrize("api", APIS)
def test_unknown_model_is_a_not_found_error(vllm_url, tmp_path, api):
    """Without backend_model the claude-* name reaches vLLM: its 404 (type NotFoundError) becomes not_found_error."""
    port = free_port()
    with mitmdump(port, tmp_path / "mitm.log", backend=vllm_url, backend_api=api, capture_file=""):
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0, timeout=120)
        with pytest.raises(anthropic.NotFoundError) as exc:
            client.messages.create(model=CLAUDE, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert exc.value.body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("api", APIS)
def test_usage_with_cache_reads_reaches_the_client(proxies, api):
    client = client_for(proxies, api)
    system = f"Session {uuid.uuid4().hex}.\n{STABLE}"  # a prefix no earlier test has cached
    kw = dict(model=CLAUDE, max_tokens=4, extra_body={"temperature": 0}, system=system,
              messages=[{"role": "user", "content": "Say hi."}])
    with client.messages.stream(**kw) as s:
        cold = s.get_final_message().usage
    with client.messages.stream(**kw) as s:
        warm = s.get_final_message().usage
    assert not cold.cache_read_input_tokens
    assert warm.cache_read_input_tokens and warm.cache_read_input_tokens >= 256  # whole 128-token blocks
    def total(u):  # Anthropic's accounting: the prompt is input + cache reads + cache writes
        return u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)

    assert total(warm) == total(cold)
    _, cap = proxies[(api, True)]
    assert any((r.get("usage") or {}).get("cache_read_input_tokens") == warm.cache_read_input_tokens
               for r in read_capture(cap))


def _hit_rate(client: anthropic.Anthropic, vllm_url: str, system_for, turns: int = 3) -> float:
    """Prefix-cache hit rate (vLLM's /metrics) over `turns` requests after a first one, each with
    a new nonce; the first request only fills the cache."""
    body = dict(model=CLAUDE, max_tokens=2, extra_body={"temperature": 0}, messages=[{"role": "user", "content": "Say hi."}])
    client.messages.create(system=system_for(), **body)
    q0, h0 = prefix_cache_counters(vllm_url)
    for _ in range(turns):
        client.messages.create(system=system_for(), **body)
    q1, h1 = prefix_cache_counters(vllm_url)
    assert q1 > q0
    return (h1 - h0) / (q1 - q0)


@pytest.mark.parametrize("api", APIS)
def test_volatile_fragment_vllm_misses_goes_from_0_to_90_percent_hits(proxies, vllm_url, api):
    run = uuid.uuid4().hex[:8]  # keeps this test's prefix apart from every other test's

    def system_for():
        return [{"type": "text", "text": BILLING.format(uuid.uuid4().hex[:3])},
                {"type": "text", "text": f"request-nonce: {uuid.uuid4().hex}\nRun {run}.\n{STABLE}"}]

    off = _hit_rate(client_for(proxies, api, normalize=False), vllm_url, system_for)
    run = uuid.uuid4().hex[:8]
    on = _hit_rate(client_for(proxies, api, normalize=True), vllm_url, system_for)
    print(f"{api}: prefix-cache hits normalize=false {off:.1%}, normalize=true {on:.1%}")
    assert off == 0.0
    assert on >= 0.90


def test_vllm_generates_mlx_lms_greedy_tokens(vllm_url, model_dir):
    """Same weights in every engine: vLLM on the HF export (float32) decodes greedily the tokens
    mlx-lm decodes from the embedded server's model directory."""
    from warmturn.server.hf_export import VERIFY_PROMPTS, greedy_tokens

    want = greedy_tokens(model_dir)
    for prompt, ids in zip(VERIFY_PROMPTS, want, strict=True):
        r = httpx.post(f"{vllm_url}/v1/chat/completions", timeout=300, json={
            "model": VLLM_MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
            "temperature": 0, "return_token_ids": True})
        got = r.json()["choices"][0]["token_ids"]
        assert got[:len(ids)] == ids, prompt
