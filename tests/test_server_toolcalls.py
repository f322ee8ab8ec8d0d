"""Streaming post-processing on plain data: tool calls, stop sequences, event assembly."""

from __future__ import annotations

import importlib
import json
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmturn.protocol import MessageStream, Usage
from warmturn.server.toolcalls import (
    HERMES,
    OutputAssembler,
    StopMatcher,
    TextPiece,
    ToolCall,
    ToolCallFormat,
    ToolCallParser,
    extract_json,
    merge_text,
)

CALL = '<tool_call>\n{"name": "Read", "arguments": {"file_path": "/tmp/a.txt"}}\n</tool_call>'
READ = ToolCall("Read", {"file_path": "/tmp/a.txt"})


def run_parser(pieces, fmt=HERMES):
    p = ToolCallParser(fmt)
    out = []
    for piece in pieces:
        out += p.feed(piece)
    out += p.finish()
    return merge_text(out)


def splits(text):
    """Every way to cut ``text`` in two, plus one character at a time."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


CASES = [
    ("plain text", "Hello, world. 1 < 2 and a <b> tag.", [TextPiece("Hello, world. 1 < 2 and a <b> tag.")]),
    ("one call", CALL, [READ]),
    ("text around a call", "Let me look." + CALL + " Done.", [TextPiece("Let me look."), READ, TextPiece(" Done.")]),
    ("two calls", CALL + "\n" + CALL.replace("a.txt", "b.txt"),
     [READ, TextPiece("\n"), ToolCall("Read", {"file_path": "/tmp/b.txt"})]),
    ("malformed JSON is text", "x<tool_call>{not json}</tool_call>y", [TextPiece("x<tool_call>{not json}</tool_call>y")]),
    ("missing name is text", '<tool_call>{"arguments": {}}</tool_call>', [TextPiece('<tool_call>{"arguments": {}}</tool_call>')]),
    ("arguments must be an object", '<tool_call>{"name": "A", "arguments": [1]}</tool_call>',
     [TextPiece('<tool_call>{"name": "A", "arguments": [1]}</tool_call>')]),
    ("arguments as a JSON string", '<tool_call>{"name": "A", "arguments": "{\\"x\\": 1}"}</tool_call>',
     [ToolCall("A", {"x": 1})]),
    ("parameters alias", '<tool_call>{"name": "A", "parameters": {"x": 2}}</tool_call>', [ToolCall("A", {"x": 2})]),
    ("no arguments", '<tool_call>{"name": "Now"}</tool_call>', [ToolCall("Now", {})]),
    ("unterminated but complete call", '<tool_call>{"name": "A", "arguments": {"x": 1}}', [ToolCall("A", {"x": 1})]),
    ("unterminated broken call is text", "ok <tool_call>{\"name\": \"A\", \"argu",
     [TextPiece('ok <tool_call>{"name": "A", "argu')]),
    ("marker prefix at the end is released", "see <tool_ca", [TextPiece("see <tool_ca")]),
    ("empty call body is text", "<tool_call></tool_call>", [TextPiece("<tool_call></tool_call>")]),
    ("a body that is no JSON object is text", '<tool_call>\n("articles", 3)</tool_call>',
     [TextPiece('<tool_call>\n("articles", 3)</tool_call>')]),
    ("prose after the marker, then a real call", 'hm <tool_call> no. <tool_call>{"name": "Now"}</tool_call>',
     [TextPiece("hm <tool_call> no. "), ToolCall("Now", {})]),
]


@pytest.mark.parametrize("name,text,expected", CASES, ids=[c[0] for c in CASES])
def test_tool_calls_any_split(name, text, expected):
    for pieces in splits(text):
        assert run_parser(pieces) == expected, pieces


def test_text_is_held_back_only_for_a_possible_marker():
    p = ToolCallParser()
    assert p.feed("Hello wor") == [TextPiece("Hello wor")]
    assert p.feed("ld <tool") == [TextPiece("ld ")]  # "<tool" might start <tool_call>
    assert p.feed("s are fun") == [TextPiece("<tools are fun")]
    assert p.feed("<") == []
    assert p.finish() == [TextPiece("<")]


def test_a_body_that_cannot_be_a_call_is_shown_at_once_not_held_to_its_end():
    """A model that writes the marker and then no JSON object (the tiny default model does, and
    held its whole answer back for it): the text flows from the first character that decides."""
    p = ToolCallParser()
    assert p.feed("<tool_call>") == []
    assert p.feed("\n ") == []  # whitespace: a JSON object may still follow
    assert merge_text(p.feed('("art')) == [TextPiece('<tool_call>\n ("art')]
    assert p.feed("icles") == [TextPiece("icles")]
    assert p.finish() == []
    q = ToolCallParser()
    assert q.feed('<tool_call>\n{"na') == []  # could be a call: held
    assert q.feed('me": "Now"}</tool_call>') == [ToolCall("Now", {})]


def test_formats_without_an_early_check_hold_the_body_to_its_end():
    fmt = ToolCallFormat("<tool_call>", "</tool_call>", HERMES.parse, "no-check")
    p = ToolCallParser(fmt)
    assert p.feed('<tool_call>("art') == []
    assert p.feed("icles)</tool_call>") == [TextPiece('<tool_call>("articles)</tool_call>')]


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(st.sampled_from(["a", " ", "\n", "<", ">", "tool", "<tool_call>", "</tool_call>", '{"name": "T"}', "{"]),
                   max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_splitting_never_changes_the_result(parts, cuts):
    text = "".join(parts)
    whole = run_parser([text])
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in pairwise(bounds)]
    assert run_parser(pieces) == whole
    # Nothing is lost: without a parsed call, the text comes back exactly.
    if not any(isinstance(s, ToolCall) for s in whole):
        assert "".join(s.text for s in whole) == text


def test_mlx_lm_parser_format_qwen3_coder():
    mod = importlib.import_module("mlx_lm.tool_parsers.qwen3_coder")
    fmt = ToolCallFormat(mod.tool_call_start, mod.tool_call_end, mod.parse_tool_call, "qwen3_coder")
    text = ("Sure." + mod.tool_call_start + "\n<function=Read>\n<parameter=file_path>\n/tmp/x\n</parameter>\n</function>\n"
            + mod.tool_call_end)
    for pieces in splits(text):
        assert run_parser(pieces, fmt) == [TextPiece("Sure."), ToolCall("Read", {"file_path": "/tmp/x"})]


# --------------------------------------------------------------------------- stop sequences


def run_stops(pieces, stops):
    m = StopMatcher(stops)
    out = ""
    for piece in pieces:
        text, hit = m.feed(piece)
        out += text
        if hit:
            return out, hit
    return out + m.flush(), None


@pytest.mark.parametrize(
    "text,stops,expected",
    [
        ("Hello world. END more", ["END"], ("Hello world. ", "END")),
        ("no stop here", ["END"], ("no stop here", None)),
        ("ends with EN", ["END"], ("ends with EN", None)),
        ("a STOP b END c", ["END", "STOP"], ("a ", "STOP")),
        ("overlap ababc", ["abc"], ("overlap ab", "abc")),
        ("x\n\nHuman: y", ["\n\nHuman:"], ("x", "\n\nHuman:")),
        ("nothing", [], ("nothing", None)),
    ],
)
def test_stop_sequences_any_split(text, stops, expected):
    for pieces in splits(text):
        assert run_stops(pieces, stops) == expected, pieces


def test_stop_matcher_holds_only_a_possible_prefix():
    m = StopMatcher(["</answer>"])
    assert m.feed("yes </") == ("yes ", None)
    assert m.feed("b>") == ("</b>", None)
    assert m.feed("</answer> tail") == ("", "</answer>")
    assert m.feed("more") == ("", "</answer>")


# --------------------------------------------------------------------------- assembly


def assemble(pieces, *, stops=(), fmt=HERMES, json_mode=False, reason="stop"):
    ids = iter(range(100))
    stream = MessageStream("m", Usage(10, 3, 2), make_id=lambda p: f"{p}{next(ids)}")
    asm = OutputAssembler(stream, stops, fmt, json_mode=json_mode)
    events = stream.start()
    n = 0
    for piece in pieces:
        n += 1
        evs, hit = asm.feed(piece)
        events += evs
        if hit:
            break
    events += asm.finish(reason, n)
    return events, stream.message()


def test_assembled_events_text_then_tool_use():
    events, msg = assemble(list("I will read it." + CALL))
    types = [e["type"] for e in events]
    assert types[:2] == ["message_start", "ping"]
    assert types[-2:] == ["message_delta", "message_stop"]
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use"]
    assert starts[1]["content_block"]["input"] == {}
    json_delta = [e for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
    assert json.loads("".join(d["delta"]["partial_json"] for d in json_delta)) == READ.arguments
    text = "".join(e["delta"]["text"] for e in events
                   if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta")
    assert text == "I will read it."
    assert msg["content"][0] == {"type": "text", "text": "I will read it."}
    assert msg["content"][1]["type"] == "tool_use" and msg["content"][1]["id"].startswith("toolu_")
    assert msg["content"][1]["input"] == READ.arguments
    assert msg["stop_reason"] == "tool_use"
    assert events[-2]["usage"] == {"input_tokens": 10, "cache_read_input_tokens": 3,
                                   "cache_creation_input_tokens": 2, "output_tokens": len("I will read it." + CALL)}
    # every block start has a matching stop, indices ascend
    stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
    assert stops == [0, 1]


@pytest.mark.parametrize(
    "pieces,kwargs,stop_reason,stop_sequence,text",
    [
        (["Hi", " there"], {}, "end_turn", None, "Hi there"),
        (["Hi", " there"], {"reason": "length"}, "max_tokens", None, "Hi there"),
        (["Hi", " the", "re. ##", "# more"], {"stops": ["###"]}, "stop_sequence", "###", "Hi there. "),
        (["a <tool_call>{bad}</tool_call>"], {}, "end_turn", None, "a <tool_call>{bad}</tool_call>"),
        (["<tool_call>", '{"name":"X"}', "</tool_call>"], {"fmt": None}, "end_turn", None, '<tool_call>{"name":"X"}</tool_call>'),
        (['Sure! {"title": ', '"Hi"} hope', " this helps"], {"json_mode": True}, "end_turn", None, '{"title": "Hi"}'),
        (["no json at all"], {"json_mode": True}, "end_turn", None, "no json at all"),
    ],
)
def test_stop_reasons_and_text(pieces, kwargs, stop_reason, stop_sequence, text):
    events, msg = assemble(pieces, **kwargs)
    assert msg["stop_reason"] == stop_reason
    assert msg["stop_sequence"] == stop_sequence
    assert "".join(b.get("text", "") for b in msg["content"]) == text
    assert events[-2]["delta"] == {"stop_reason": stop_reason, "stop_sequence": stop_sequence}


def test_empty_output_still_has_one_block():
    events, msg = assemble([])
    assert msg["content"] == [{"type": "text", "text": ""}]
    assert [e["type"] for e in events] == ["message_start", "ping", "content_block_start", "content_block_stop",
                                           "message_delta", "message_stop"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"a": 1}', '{"a": 1}'),
        ('Here: {"title": "x {y}"} ok', '{"title": "x {y}"}'),
        ("{broken {\"k\": [1, 2]}", '{"k": [1, 2]}'),
        ("[1, 2]", None),
        ("nothing", None),
    ],
)
def test_extract_json(text, expected):
    assert extract_json(text) == expected
