"""wire.py on plain data: request validation, real Claude Code payloads, SSE, pagination."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES
from warmturn.protocol import MessageStream, RequestError, Usage, error_body, page_models
from warmturn.protocol import encode_sse as sse
from warmturn.server.wire import TextBlock, ToolResultBlock, ToolUseBlock, parse_messages_request

CC = FIXTURES / "claude_code"


def claude_code_bodies():
    out = [("full_first_turn", json.loads((CC / "full_first_turn.json").read_text())["body"])]
    for path in sorted(CC.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            # bench.record lines hold `body`; capture lines (schema 1) hold `request.body`
            body = rec["body"] if "body" in rec else (rec.get("request") or {}).get("body")
            if rec["method"] == "POST" and body is not None:
                out.append((f"{path.stem}#{rec.get('seq', rec.get('id'))}", body))
    return out


BODIES = claude_code_bodies()


@pytest.mark.parametrize("name,body", BODIES, ids=[b[0] for b in BODIES])
def test_every_recorded_claude_code_request_is_accepted(name, body):
    req = parse_messages_request(body)
    assert req.model == body["model"]
    assert req.max_tokens == body["max_tokens"]
    assert req.stream is True
    assert len(req.messages) == len(body["messages"])
    # thinking blocks never reach the prompt
    for m in req.messages:
        assert all(isinstance(b, (TextBlock, ToolUseBlock, ToolResultBlock)) for b in m.blocks)
    assert len(req.tools) == len(body.get("tools") or [])


def base(**kw):
    body = {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return body


@pytest.mark.parametrize(
    "body,fragment",
    [
        ([], "expected a JSON object"),
        ({"max_tokens": 5, "messages": []}, "model: Field required"),
        ({"model": "m", "max_tokens": 5}, "messages: Field required"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        (base(messages=[]), "at least one message"),
        (base(max_tokens=0), "max_tokens: out of range"),
        (base(max_tokens="9"), "max_tokens: expected a number"),
        (base(messages=[{"role": "bot", "content": "x"}]), "messages.0.role"),
        (base(messages=[{"role": "user"}]), "messages.0.content: Field required"),
        (base(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content.0.text"),
        (base(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), "no vision"),
        (base(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                      "content": [{"type": "image", "source": {}}]}]}]), "no vision"),
        (base(messages=[{"role": "user", "content": [{"type": "wat"}]}]), "unknown content block type"),
        (base(tools=[{"name": "x"}]), "tools.0.input_schema: Field required"),
        (base(tools=[{"name": "x", "input_schema": []}]), "tools.0.input_schema: expected an object"),
        (base(tool_choice={"type": "tool"}), "tool_choice.name"),
        (base(temperature=3), "temperature: out of range"),
        (base(stop_sequences=[""]), "stop_sequences"),
        (base(stream="yes"), "stream: expected a boolean"),
        (base(system=5), "system: expected a string"),
    ],
)
def test_bad_requests_say_what_is_wrong(body, fragment):
    with pytest.raises(RequestError) as e:
        parse_messages_request(body)
    assert fragment in str(e.value)
    assert e.value.status == 400 and e.value.error_type == "invalid_request_error"


def test_unused_fields_are_ignored_and_shapes_normalized():
    req = parse_messages_request(base(
        metadata={"user_id": "{}"}, thinking={"type": "adaptive"}, context_management={"edits": []},
        output_config={"effort": "high"}, something_new=True,
        system=[{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "...", "signature": "s"},
                                              {"type": "redacted_thinking", "data": "x"},
                                              {"type": "tool_use", "id": "t1", "name": "Read", "input": {"p": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
            {"role": "system", "content": "<total_tokens>9 tokens left</total_tokens>"},
        ],
    ))
    assert req.system == ("A", "B")
    assert req.messages[0].blocks == (TextBlock("hi"),)
    assert req.messages[1].blocks == (ToolUseBlock("t1", "Read", {"p": 1}),)
    assert req.messages[2].blocks == (ToolResultBlock("t1", "a\nb", False),)
    assert req.messages[3].role == "system"
    assert req.output_schema is None


def test_string_and_block_content_parse_identically():
    a = parse_messages_request(base(messages=[{"role": "user", "content": "same"}]))
    b = parse_messages_request(base(messages=[{"role": "user", "content": [{"type": "text", "text": "same"}]}]))
    assert a == b


def test_count_tokens_needs_no_max_tokens_and_output_schema_is_read():
    req = parse_messages_request({"model": "m", "messages": [{"role": "user", "content": "x"}]}, count_only=True)
    assert req.max_tokens is None
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    req = parse_messages_request(base(output_config={"format": {"type": "json_schema", "schema": schema}}))
    assert req.output_schema == schema


def test_server_tools_without_schema_are_skipped():
    req = parse_messages_request(base(tools=[{"type": "web_search_20250305", "name": "web_search"},
                                             {"name": "Read", "input_schema": {"type": "object"}}]))
    assert [t.name for t in req.tools] == ["Read"]


def test_sse_and_error_shapes():
    assert sse({"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert error_body("not_found_error", "nope", "req_1") == {
        "type": "error", "error": {"type": "not_found_error", "message": "nope"}, "request_id": "req_1"}


def test_message_stream_text_blocks_and_final_message():
    s = MessageStream("claude-x", Usage(7, 5, 1), make_id=lambda p: p + "1")
    start = s.start()
    assert start[0]["message"]["usage"] == {"input_tokens": 7, "cache_creation_input_tokens": 1,
                                            "cache_read_input_tokens": 5, "output_tokens": 0}
    assert s.text("") == []
    evs = s.text("Hel") + s.text("lo")
    assert [e["type"] for e in evs] == ["content_block_start", "content_block_delta", "content_block_delta"]
    fin = s.finish("end_turn", 2)
    assert [e["type"] for e in fin] == ["content_block_stop", "message_delta", "message_stop"]
    msg = s.message()
    assert msg["id"] == "msg_1" and msg["model"] == "claude-x"
    assert msg["content"] == [{"type": "text", "text": "Hello"}]
    assert msg["usage"]["output_tokens"] == 2


MODELS = [{"id": f"m{i}"} for i in range(5)]


@pytest.mark.parametrize(
    "kwargs,ids,has_more",
    [
        ({}, ["m0", "m1", "m2", "m3", "m4"], False),
        ({"limit": 2}, ["m0", "m1"], True),
        ({"limit": 2, "after_id": "m1"}, ["m2", "m3"], True),
        ({"after_id": "m3"}, ["m4"], False),
        ({"limit": 2, "before_id": "m4"}, ["m2", "m3"], True),
        ({"before_id": "m0"}, [], False),
    ],
)
def test_model_pagination(kwargs, ids, has_more):
    page = page_models(MODELS, **kwargs)
    assert [m["id"] for m in page["data"]] == ids
    assert page["has_more"] is has_more
    assert page["first_id"] == (ids[0] if ids else None)


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"after_id": "zz"}, {"before_id": "zz"}])
def test_model_pagination_errors(kwargs):
    with pytest.raises(RequestError):
        page_models(MODELS, **kwargs)
