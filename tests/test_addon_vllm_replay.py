"""Regression tests for the bugs a real vLLM exposed (issue 10), on vLLM's own recorded bytes.

A real `mitmdump -s addons/normalize.py` sits between the official anthropic SDK and a replay server
that sends back, byte for byte and one HTTP chunk per write, what vLLM 0.32 sent when the exchanges in
tests/fixtures/vllm/ were recorded (see its README). No engine runs here: the bytes are vLLM's. One mitmdump
and replay server per set of addon options serve the module; each test sets the routes and reads its own
capture lines.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager

import anthropic
import httpx
import pytest

from tests.conftest import free_port
from tests.procs import mitmdump, read_capture
from tests.vllm_replay import ReplayServer, load
from warmturn.addons.backends import AnthropicAdapter, OpenAIAdapter, parse_backend
from warmturn.addons.state import FlowState
from warmturn.addons.tap import make_tap
from warmturn.protocol import MessageFold

CLAUDE = "claude-opus-4-8"
USER = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"name": "get_weather", "description": "Current weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


class Capture:
    """The capture lines of a test's requests (those that came after its start) in the module's shared file."""

    def __init__(self, path) -> None:
        self.path, self.t0 = path, time.time()

    def lines(self, n: int = 1) -> list[dict]:
        """This test's lines, once there are at least `n` (the addon writes a line as its flow ends)."""
        deadline = time.monotonic() + 30
        while True:
            lines = [x for x in read_capture(self.path) if x["t"]["request"] >= self.t0]
            if len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    """mitmdump + addon in front of its own replay server, one per set of options, kept for the module."""
    made: dict = {}
    with ExitStack() as stack:
        def get(**options):
            key = tuple(sorted(options.items()))
            if key not in made:
                d = tmp_path_factory.mktemp("proxy")
                replay = stack.enter_context(ReplayServer({}))
                port, cap = free_port(), d / "cap.jsonl"
                stack.enter_context(mitmdump(port, d / "mitm.log", backend=replay.url, capture_file=cap, **options))
                made[key] = (replay, port, cap)
            return made[key]

        yield get


@contextmanager
def through_addon(proxies, routes: dict[str, str], **options):
    """(anthropic client, replay server, capture): the SDK -> mitmdump + addon -> vLLM's recorded bytes."""
    replay, port, cap = proxies(**options)
    replay.routes = dict(routes)
    replay.received.clear()
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="sk-test", max_retries=0, timeout=60)
    yield client, replay, Capture(cap)


def usage_chunk(name: str) -> dict:
    """The `"choices": []` usage chunk of a recorded Chat Completions stream."""
    rec = load(name)
    events = [c for c in rec.chunks if c.startswith(b"data: {")]
    last = json.loads(events[-1][len(b"data: "):])
    assert last["choices"] == [] and last["usage"]
    return last["usage"]


# ----- bug 1: vLLM's separate usage chunk must not end the chunked body -------------------------

def test_recorded_stream_has_the_usage_chunk_alone_in_its_http_chunk():
    """The premise, from the recording: one HTTP chunk holds only the usage event, which translates
    to no Anthropic event at all; the old tap returned b"" for it, a zero-length chunk that ended
    the body for the client."""
    rec = load("chat_stream_text")
    alone = [c for c in rec.chunks if b'"choices":[]' in c]
    assert len(alone) == 1 and alone[0].count(b"data: ") == 1
    assert rec.chunks[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("name", ["chat_stream_text", "chat_stream_tool"])
def test_tap_sends_nothing_for_the_usage_chunk_and_never_an_empty_chunk(name):
    """The stream callable, fed vLLM's chunks as they came: a chunk that translates to nothing is an
    empty list (mitmproxy sends nothing), never b"" (mitmproxy would send the body's terminator)."""
    state = FlowState(kind="messages", model=CLAUDE, translated_from={"model": CLAUDE})
    state.live.translate = OpenAIAdapter(parse_backend("http://127.0.0.1:9")).stream_translator(state)
    tap = make_tap(state)
    rec = load(name)
    outs = [tap(chunk) for chunk in rec.chunks]
    end = tap(b"")
    assert all(isinstance(o, list) and all(o) for o in [*outs, end])
    usage_at = next(i for i, c in enumerate(rec.chunks) if b'"choices":[]' in c)
    assert outs[usage_at] == []
    sent = b"".join(b"".join(o) for o in [*outs, end])
    fold = MessageFold().add_bytes(sent)
    usage = usage_chunk(name)
    assert fold.usage["output_tokens"] == usage["completion_tokens"]
    assert sent.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_anthropic_backend_tap_passes_vllms_chunks_as_they_are():
    state = FlowState(kind="messages", model=CLAUDE)
    state.live.translate = AnthropicAdapter(parse_backend("http://127.0.0.1:9")).stream_translator(state)
    tap = make_tap(state)
    rec = load("messages_stream_tool")
    assert [tap(c) for c in rec.chunks] == [[c] for c in rec.chunks] and tap(b"") == []
    assert state.live.fold.usage == {"input_tokens": 54, "output_tokens": 31, "cache_creation_input_tokens": 0,
                                     "cache_read_input_tokens": 128}
    assert state.live.fold.content == [{"type": "tool_use", "id": "chatcmpl-tool-a657a616a1b2aab3",
                                        "name": "get_weather", "input": {"city": "Paris"}}]


@pytest.mark.parametrize("name", ["chat_stream_text", "chat_stream_text_warm", "chat_stream_text_cold"])
def test_openai_backend_stream_reaches_message_stop_with_vllms_usage(proxies, name):
    usage = usage_chunk(name)
    with (through_addon(proxies, {"/v1/chat/completions": name}, backend_api="openai",
                        backend_model="smollm2") as (client, replay, cap),
          client.messages.stream(model=CLAUDE, max_tokens=12, messages=USER) as s):
        kinds = [e.type for e in s]
        msg = s.get_final_message()
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "".join(b.text for b in msg.content) == "The capital of France is Paris."
    details = usage["prompt_tokens_details"]
    cached, created = details["cached_tokens"], details.get("created_cache_tokens", 0)
    assert msg.usage.output_tokens == usage["completion_tokens"]
    assert msg.usage.input_tokens == usage["prompt_tokens"] - cached - created
    assert (msg.usage.cache_read_input_tokens or 0) == cached
    assert (msg.usage.cache_creation_input_tokens or 0) == created
    assert replay.received[-1]["body"]["model"] == "smollm2"
    [line] = cap.lines()
    assert line["usage"]["output_tokens"] == usage["completion_tokens"]


def test_openai_backend_streamed_tool_call(proxies):
    """vLLM ends a named-tool-choice stream with finish_reason "stop": still a tool_use turn for the client."""
    with (through_addon(proxies, {"/v1/chat/completions": "chat_stream_tool"}, backend_api="openai",
                        backend_model="smollm2") as (client, replay, _),
          client.messages.stream(model=CLAUDE, max_tokens=40, tools=[WEATHER],
                                 tool_choice={"type": "tool", "name": "get_weather"},
                                 messages=[{"role": "user", "content": "What is the weather in Paris?"}]) as s):
        kinds = [e.type for e in s]
        msg = s.get_final_message()
    assert kinds[-1] == "message_stop"
    [call] = msg.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use"
    assert msg.usage.output_tokens == usage_chunk("chat_stream_tool")["completion_tokens"]
    sent = replay.received[-1]["body"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_anthropic_backend_stream_passes_through_byte_for_byte_with_cache_usage(proxies):
    rec = load("messages_stream_text_warm")
    with through_addon(proxies, {"/v1/messages": "messages_stream_text_warm"},
                       backend_model="smollm2") as (client, _replay, cap):
        with httpx.stream("POST", str(client.base_url).rstrip("/") + "/v1/messages", timeout=60,
                          headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
                          json={"model": CLAUDE, "max_tokens": 12, "stream": True, "messages": USER}) as r:
            body = b"".join(r.iter_raw())
        with client.messages.stream(model=CLAUDE, max_tokens=12, messages=USER) as s:
            msg = s.get_final_message()
    assert body == rec.body
    # vLLM reports cache usage only in message_delta (its message_start says input_tokens 742)
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (102, 640, 8)
    assert cap.lines(2)[-1]["usage"]["cache_read_input_tokens"] == 640


# ----- bug 2: count_tokens gets backend_model too ------------------------------------------------

@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_count_tokens_maps_the_model_name(proxies, api):
    with through_addon(proxies, {"/v1/messages/count_tokens": "count_tokens"}, backend_api=api,
                       backend_model="smollm2") as (client, replay, cap):
        got = client.messages.count_tokens(model=CLAUDE, system="You are terse.", messages=USER)
    assert got.input_tokens == load("count_tokens").json()["input_tokens"] == 742
    [req] = [r for r in replay.received if r["path"] == "/v1/messages/count_tokens"]
    assert req["body"]["model"] == "smollm2"
    assert cap.lines()[-1]["usage"] == {"input_tokens": 742}


# ----- bug 3: vLLM's error bodies become Anthropic error types -----------------------------------

@pytest.mark.parametrize("api, path, name, exc, kind", [
    ("anthropic", "/v1/messages", "messages_404_model", anthropic.NotFoundError, "not_found_error"),
    ("anthropic", "/v1/messages", "messages_400_max_tokens", anthropic.BadRequestError, "invalid_request_error"),
    ("openai", "/v1/chat/completions", "chat_404_model", anthropic.NotFoundError, "not_found_error"),
    ("openai", "/v1/chat/completions", "chat_400_max_tokens", anthropic.BadRequestError, "invalid_request_error"),
])
def test_backend_errors_become_anthropic_error_types(proxies, api, path, name, exc, kind):
    original = load(name).json()
    with through_addon(proxies, {path: name}, backend_api=api) as (client, _, cap), pytest.raises(exc) as e:
        client.messages.create(model=CLAUDE, max_tokens=12, messages=USER)
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == kind
    vllm_message = (original.get("error") or {}).get("message")
    assert vllm_message and vllm_message in body["error"]["message"]
    assert cap.lines()[-1]["error"]["type"] == kind


def test_count_tokens_error_becomes_not_found_error(proxies):
    with (through_addon(proxies, {"/v1/messages/count_tokens": "count_tokens_404_model"}) as (client, _, _),
          pytest.raises(anthropic.NotFoundError) as e):
        client.messages.count_tokens(model=CLAUDE, messages=USER)
    assert e.value.body["error"]["type"] == "not_found_error"
