"""warmturn/protocol/, rules.py and machine.py: the shared wire protocol on recorded traffic,
with the official anthropic SDK's own stream reducer as the oracle for the fold."""

from __future__ import annotations

import json
import socket

import pytest
from anthropic.lib.streaming._messages import accumulate_event

from tests.conftest import FIXTURES
from warmturn import machine, protocol, rules

PROTO = FIXTURES / "protocol"
CC = FIXTURES / "claude_code"
RECORDED_STREAMS = ["server_text.sse", "server_tool.sse"]


def recorded_posts() -> list[dict]:
    out = [json.loads((CC / "full_first_turn.json").read_text())]
    for path in sorted(CC.glob("*.jsonl")):
        out += [json.loads(x) for x in path.read_text().splitlines()]
    # capture-format fixtures (schema 1) hold the body under request.body
    out = [r if "body" in r else {**r, "body": (r.get("request") or {}).get("body"),
                                  "headers": (r.get("request") or {}).get("headers", {})} for r in out]
    return [r for r in out if r["method"] == "POST" and isinstance(r["body"], dict)]


def sdk_fold(events: list[dict]):
    """The anthropic SDK's accumulate_event over decoded events (what the SDK's client would build)."""
    snapshot, bufs = None, {}
    for ev in events:
        if ev.get("type") in ("ping", "error"):
            continue
        snapshot = accumulate_event(event=ev, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def our_fold(events: list[dict]) -> protocol.MessageFold:
    fold = protocol.MessageFold()
    for ev in events:
        fold.add_event(ev)
    return fold


def assert_same_as_sdk(fold: protocol.MessageFold, snapshot) -> None:
    sdk = snapshot.to_dict()
    assert fold.content == sdk["content"]
    assert fold.stop_reason == sdk["stop_reason"] and fold.stop_sequence == sdk["stop_sequence"]
    assert fold.model == sdk["model"] and fold.id == sdk["id"]
    assert fold.usage == {k: v for k, v in sdk["usage"].items() if isinstance(v, int)}


# --------------------------------------------------------------------------- SSE decoding


@pytest.mark.parametrize("name", RECORDED_STREAMS)
@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 10**6])
def test_decoder_is_chunk_split_safe_on_recorded_streams(name, chunk):
    data = (PROTO / name).read_bytes()
    whole = protocol.decode_sse(data)
    assert whole and all(ev.event == ev.json()["type"] for ev in whole)
    for variant in (data, data.replace(b"\n", b"\r\n"), data.replace(b"\n", b"\r")):
        dec = protocol.SSEDecoder()
        got = [ev for i in range(0, len(variant), chunk) for ev in dec.feed(variant[i:i + chunk])] + dec.flush()
        assert got == whole


def test_decoder_delivers_an_unterminated_last_event_and_skips_comments():
    dec = protocol.SSEDecoder()
    assert dec.feed(b": keep-alive\nevent: ping\ndata: {\"type\"") == []
    assert dec.feed(b": \"ping\"}") == []
    assert dec.flush() == [protocol.SSEEvent("ping", '{"type": "ping"}')]
    assert protocol.decode_sse("data: a\ndata: é\n\n".encode()) == [protocol.SSEEvent(None, "a\né")]


# --------------------------------------------------------------------------- fold vs the SDK


@pytest.mark.parametrize("name", RECORDED_STREAMS)
def test_fold_equals_the_sdk_accumulate_event_on_recorded_streams(name):
    events = [ev.json() for ev in protocol.decode_sse((PROTO / name).read_bytes())]
    fold = our_fold(events)
    assert_same_as_sdk(fold, sdk_fold(events))
    assert (fold.saw_content and fold.text) or any(b["type"] == "tool_use" for b in fold.content)


def test_recorded_tool_stream_folds_to_a_tool_use_with_parsed_input():
    fold = protocol.MessageFold().add_bytes((PROTO / "server_tool.sse").read_bytes())
    tools = [b for b in fold.content if b["type"] == "tool_use"]
    assert tools and tools[0]["name"] == "get_weather" and tools[0]["input"] == {"city": "Rome"}
    assert fold.stop_reason == "tool_use"


def test_fold_handles_thinking_and_signature_delta_like_the_sdk():
    """A thinking block (which the local model never produces, so no recording has one): the events
    come from the shared builder's message skeleton, the thinking deltas as Anthropic documents them."""
    start = protocol.MessageStream("claude-opus-4-8", protocol.Usage(5), id="msg_x").start()
    events = start + [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM2"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        # deltas of the wrong kind for their block are ignored, as the SDK does
        {"type": "content_block_delta", "index": 1, "delta": {"type": "signature_delta", "signature": "nope"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi."}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 9, "cache_read_input_tokens": None}},
        {"type": "message_stop"},
    ]
    fold = our_fold(events)
    assert_same_as_sdk(fold, sdk_fold(events))
    assert fold.content[0]["signature"] == "EqQBCgIYAhIM2", "a signature_delta replaces, it does not append"
    assert fold.usage["cache_read_input_tokens"] == 0, "a null usage field keeps the earlier value"


def test_builder_output_is_what_the_sdk_builds_and_what_message_says():
    stream = protocol.MessageStream("claude-opus-4-8", protocol.Usage(10, cache_read_input_tokens=90))
    events = stream.start() + stream.text("Let me ") + stream.text("look.") + stream.open_tool("Read")
    events += stream.tool_input('{"file_pa') + stream.tool_input('th": "a.txt"}') + stream.text("")
    events += stream.tool_use("Grep", {"pattern": "x"}) + stream.finish("tool_use", 7)
    wire = b"".join(protocol.encode_sse(e) for e in events)
    decoded = [ev.json() for ev in protocol.decode_sse(wire)]
    assert decoded == events
    snapshot = sdk_fold(decoded)
    assert snapshot.to_dict()["content"] == stream.message()["content"]
    assert stream.message()["content"][1]["input"] == {"file_path": "a.txt"}
    assert_same_as_sdk(our_fold(decoded), snapshot)
    assert stream.message()["usage"] == {"input_tokens": 10, "cache_creation_input_tokens": 0,
                                         "cache_read_input_tokens": 90, "output_tokens": 7}


def test_builder_error_event_and_empty_message():
    stream = protocol.MessageStream("m", {"input_tokens": 0}, id="msg_1")
    events = stream.error("overloaded_error", "busy")
    assert [e["type"] for e in events] == ["message_start", "error"]
    assert our_fold(events).error == {"type": "overloaded_error", "message": "busy"}
    empty = protocol.MessageStream("m")
    kinds = [e["type"] for e in empty.start() + empty.finish("end_turn", 0)]
    assert kinds == ["message_start", "ping", "content_block_start", "content_block_stop", "message_delta", "message_stop"]
    assert empty.message()["content"] == [{"type": "text", "text": ""}]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (529, "overloaded_error"), (503, "overloaded_error"), (502, "api_error"), (422, "invalid_request_error"),
])
def test_one_status_to_type_map(status, kind):
    assert protocol.error_type_for(status) == kind
    assert protocol.error_for_status(status, "m") == {"type": "error", "error": {"type": kind, "message": "m"}}


def test_recorded_server_error_body_is_anthropic_shaped():
    body = json.loads((PROTO / "server_error.json").read_text())
    assert protocol.is_error_body(body) and body["error"]["type"] == protocol.error_type_for(400)
    fold = protocol.MessageFold().add_bytes((PROTO / "server_error.json").read_bytes())
    assert fold.error["type"] == "invalid_request_error" and "max_tokens" in fold.error["message"]


# --------------------------------------------------------------------------- identity, kind, redaction


def test_session_agent_and_subagent_on_recorded_claude_code_requests():
    posts = recorded_posts()
    assert posts
    subagents = 0
    for rec in posts:
        headers, body = rec["headers"], rec["body"]
        sid = protocol.session_id(headers, body)
        assert sid and sid == headers["x-claude-code-session-id"]
        assert protocol.session_id({}, body) == sid, "metadata.user_id carries the same session id"
        sub = protocol.is_subagent(headers, body)
        assert sub == ("x-claude-code-agent-id" in headers) == protocol.find_billing(body).is_subagent
        subagents += sub
        assert protocol.request_kind(rec["path"], body) in ("messages", "count_tokens")
    assert subagents >= 1
    assert protocol.session_id({}, {"metadata": {"user_id": "user_ab_account__session_1234abcd-00"}}) == "1234abcd-00"
    assert protocol.session_id(None, {"metadata": {"user_id": 5}}) is None


@pytest.mark.parametrize("path, body, kind", [
    ("/v1/messages?beta=true", None, "messages"), ("/v1/messages/", None, "messages"),
    ("/base/v1/messages/count_tokens?beta=true", None, "count_tokens"), ("/v1/models", None, "models"),
    ("/v1/models/claude-opus-4-8", None, "models"), ("/", None, "other"), ("", {"messages": []}, "messages"),
    ("/health", None, "other"),
])
def test_request_kind(path, body, kind):
    assert protocol.request_kind(path, body) == kind


def test_redaction_of_headers_and_bodies():
    pairs = [("X-Api-Key", "sk-1"), ("Accept", "a"), ("accept", "b"), ("Authorization", "Bearer t"), ("Cookie", "c")]
    assert protocol.redact_headers(pairs) == {"x-api-key": "<redacted>", "accept": "a, b",
                                              "authorization": "<redacted>", "cookie": "<redacted>"}
    assert protocol.redact_headers({"Set-Cookie": "s"}) == {"set-cookie": "<redacted>"}
    assert protocol.redact_json([{"x": {"Authorization": "t", "keep": 1}}]) == [{"x": {"Authorization": "<redacted>", "keep": 1}}]


def test_models_listing_and_pages():
    models = [protocol.model_info(m) for m in protocol.CLAUDE_MODELS]
    page = protocol.page_models(models, limit=2, after_id=protocol.CLAUDE_MODELS[0])
    assert [m["id"] for m in page["data"]] == list(protocol.CLAUDE_MODELS[1:3]) and page["has_more"]
    with pytest.raises(protocol.RequestError):
        protocol.page_models(models, after_id="gpt-4")
    assert all(protocol.is_claude_model(m) for m in protocol.CLAUDE_MODELS)


# --------------------------------------------------------------------------- rules round trip


def test_stripped_entries_round_trip_and_restore_the_recorded_request():
    rec = json.loads((CC / "full_first_turn.json").read_text())
    body = rec["body"]
    headers = {**rec["headers"], "x-stainless-retry-count": "0"}
    r = rules.Rules.make(fragments=[*rules.DEFAULT_VOLATILE_FRAGMENTS, r"Today's date is [^\n]*\n?"])
    new_body, stripped = r.apply(body)
    kept, dropped = r.apply_headers(headers.items())
    entries = [rules.stripped_from_json(json.loads(json.dumps(e.to_json()))) for e in stripped + dropped]
    assert entries == stripped + dropped
    assert rules.restore(new_body, dict(kept), entries) == (body, {k.lower(): v for k, v in headers.items()})
    assert "system block 0" in rules.describe(entries) and "header x-stainless-retry-count" in rules.describe(entries)
    assert rules.StrippedHeader("x-api-key", "X-Api-Key", "sk").redacted().value == "<redacted>"
    with pytest.raises(ValueError):
        rules.stripped_from_json({"kind": "tool"})


# --------------------------------------------------------------------------- machine


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("LOCALHOST.", True), ("::1%lo", True), ("10.0.0.1", False), ("0.0.0.0", False),
    ("example.com", False), ("127.0.0.1.nip.io", False),
    # the legacy spellings a socket accepts (machine.canonical_ip, the one reading of an address)
    ("127.1", True), ("2130706433", True), ("0x7f.1", True), ("[::ffff:127.0.0.2]", True), ("0", False),
    ("127.0.0.1 evil.example", False),  # inet_aton itself reads this as 127.0.0.1
])
def test_is_loopback(host, expected):
    assert machine.is_loopback(host) is expected


def test_openblas_env(tmp_path):
    lib = tmp_path / "libblas.so.3"
    lib.write_bytes(b"")
    got = machine.openblas_env({"LD_PRELOAD": "/other.so"}, "linux", str(lib))
    assert got["LD_PRELOAD"] == f"{lib}:/other.so"
    assert machine.openblas_env({"LD_PRELOAD": f"{lib}"}, "linux", str(lib)) == {"LD_PRELOAD": str(lib)}
    assert machine.openblas_env({}, "darwin", str(lib)) == {}
    assert machine.openblas_env({machine.OPENBLAS_OPT_OUT: "1"}, "linux", str(lib)) == {machine.OPENBLAS_OPT_OUT: "1"}


def test_free_port_can_be_bound():
    port = machine.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
