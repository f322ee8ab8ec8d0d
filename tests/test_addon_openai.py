"""Anthropic Messages <-> OpenAI Chat Completions translation (addons/openai_translate.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES
from warmturn.addons import openai_translate as ot
from warmturn.addons.backends import OpenAIAdapter, parse_backend
from warmturn.protocol import MessageFold, SSEDecoder

OPENAI_SSE = (FIXTURES / "addon" / "openai_stream.sse").read_bytes()


def fold(data: bytes) -> tuple[MessageFold, list[str]]:
    dec, fo, kinds = SSEDecoder(), MessageFold(), []
    for ev in dec.feed(data) + dec.flush():
        kinds.append(ev.event)
        assert json.loads(ev.data)["type"] == ev.event
        fo.add(ev)
    return fo, kinds


def test_request_translation_of_a_tool_round():
    body = {
        "model": "claude-opus-4-8", "max_tokens": 64, "temperature": 0.2, "stream": True, "stop_sequences": ["END"],
        "system": [{"type": "text", "text": "You are terse."},
                   {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "Read", "description": "Read a file",
                   "input_schema": {"type": "object", "properties": {"p": {"type": "string"}}}},
                  {"type": "web_search_20250305", "name": "web_search"}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Read a.txt"},
            {"role": "system", "content": "<system-reminder>ctx</system-reminder>"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                              {"type": "text", "text": "Sure."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"p": "a.txt"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "text", "text": "hello"}]},
                                         {"type": "text", "text": "And?"}]},
        ]}
    req = ot.to_openai_request(body, "default_model")
    assert req["model"] == "default_model" and req["max_tokens"] == 64 and req["temperature"] == 0.2
    assert req["stop"] == ["END"] and req["stream"] and req["stream_options"] == {"include_usage": True}
    assert req["tool_choice"] == "required" and req["parallel_tool_calls"] is False
    assert [t["function"]["name"] for t in req["tools"]] == ["Read"]
    assert req["tools"][0]["function"]["parameters"]["properties"] == {"p": {"type": "string"}}
    assert req["messages"] == [
        {"role": "system", "content": "You are terse.\n\nBe kind."},
        {"role": "user", "content": "Read a.txt"},
        {"role": "system", "content": "<system-reminder>ctx</system-reminder>"},
        {"role": "assistant", "content": "Sure.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "Read", "arguments": '{"p": "a.txt"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "hello"},
        {"role": "user", "content": "And?"},
    ]
    assert ot.to_openai_request({"model": "m", "messages": []})["model"] == "m"


@pytest.mark.parametrize("bad", [{"model": "m"}, {"messages": [{"role": "robot", "content": "x"}]}, {"messages": ["x"]}])
def test_bad_requests_raise(bad):
    with pytest.raises(ValueError):
        ot.to_openai_request(bad)


@pytest.mark.parametrize("chunk", [1, 5, 200, 10**6])
def test_stream_translation_text_parallel_tools_usage(chunk):
    tr = ot.StreamTranslator("claude-opus-4-8")
    out = b"".join(tr.feed(OPENAI_SSE[i:i + chunk]) for i in range(0, len(OPENAI_SSE), chunk)) + tr.feed(b"")
    fo, kinds = fold(out)
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 3
    assert fo.model == "claude-opus-4-8" and fo.stop_reason == "tool_use"
    assert fo.content == [{"type": "text", "text": "Reading it."},
                          {"type": "tool_use", "id": "call_1", "name": "Read", "input": {"file_path": "a.txt"}},
                          {"type": "tool_use", "id": "call_2", "name": "Read", "input": {"file_path": "b.txt"}}]
    assert fo.usage == {"input_tokens": 20, "output_tokens": 30, "cache_read_input_tokens": 100}


def test_stream_without_done_or_usage_still_terminates_and_errors_translate():
    tr = ot.StreamTranslator("m")
    out = tr.feed(b'data: {"id":"x","choices":[{"delta":{"content":"hi"},"finish_reason":"length"}]}\n\n') + tr.feed(b"")
    fo, kinds = fold(out)
    assert fo.content == [{"type": "text", "text": "hi"}] and fo.stop_reason == "max_tokens"
    assert kinds[-1] == "message_stop"
    tr = ot.StreamTranslator("m")
    fo, kinds = fold(tr.feed(b'data: {"error": {"message": "model exploded"}}\n\n') + tr.feed(b""))
    assert fo.error == {"type": "api_error", "message": "backend error: model exploded"}
    assert "message_stop" not in kinds


def test_non_streamed_response_and_errors():
    resp = {"id": "c1", "choices": [{"message": {"role": "assistant", "content": "Hi", "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "Read", "arguments": "{\"p\": 1}"}}]},
        "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 10, "completion_tokens": 3}}
    msg = ot.from_openai_response(resp, "claude-x")
    assert msg["content"] == [{"type": "text", "text": "Hi"},
                              {"type": "tool_use", "id": "call_9", "name": "Read", "input": {"p": 1}}]
    assert msg["stop_reason"] == "tool_use" and msg["usage"] == {"input_tokens": 10, "output_tokens": 3}
    assert msg["model"] == "claude-x" and msg["type"] == "message"
    map_error = OpenAIAdapter(parse_backend("http://b:1")).map_error
    err = map_error(404, b'{"error": {"message": "no such model", "type": "not_found"}}', "http://b:1")
    assert err == {"type": "error", "error": {"type": "not_found_error",
                                              "message": "backend http://b:1 returned HTTP 404: no such model"}}
    assert map_error(503, b"busy", "b")["error"]["type"] == "overloaded_error"
