"""The model-identity rule (warmturn/model_identity.py, applied by warmturn.rules.Rules): on real Claude Code
requests of both versions, the name and id become one stable form and nothing else changes."""

from __future__ import annotations

import copy
import json

import pytest

from tests.conftest import FIXTURES
from warmturn import model_identity, rules

RULES = rules.Rules.make()


def posts(path):
    return [r["body"] for r in map(json.loads, path.read_text().splitlines())
            if r["method"] == "POST" and "count_tokens" not in r["path"] and isinstance(r.get("body"), dict)]


def test_2_1_197_first_turn_and_continue_share_system_and_tools():
    """2.1.197 names the model "Opus 4.8 (1M context)"/claude-opus-4-8[1m] in a first -p turn and "Opus 4.8"/
    claude-opus-4-8 after --continue (system text and the Bash tool): canonicalized, the prefix is equal."""
    first, second = posts(FIXTURES / "claude_code" / "full_two_turns.jsonl")
    assert "claude-opus-4-8[1m]" in json.dumps(first["system"]) and "[1m]." not in json.dumps(second["system"])
    plain = rules.Rules.make(identity=False)
    assert rules.prefix_stats(plain.apply(first)[0]) != rules.prefix_stats(plain.apply(second)[0])
    a, sa = RULES.apply(first)
    b, sb = RULES.apply(second)
    assert rules.prefix_stats(a) == rules.prefix_stats(b)
    assert {e.path for e in sa if e.kind == "rewrite"} == {"system[1].text", "tools[1].description"}
    for body, stripped in ((first, sa), (second, sb)):
        assert rules.restore(a if body is first else b, None, stripped)[0] == body


def test_2_1_332_model_line_in_a_role_system_message():
    """2.1.332 moved the model line into the role=system message after the first prompt."""
    rec = json.loads((FIXTURES / "claude_code_2.1.332" / "p_small.jsonl").read_text().splitlines()[0])
    original = rules.restore(rec["request"]["body"], None, rec["stripped"])[0]
    new, stripped = RULES.apply(original)
    paths = [(e.path, e.text, e.replacement) for e in stripped if e.kind == "rewrite"]
    assert paths == [("messages[1].content[0].text", "Opus 5.5", "Claude"),
                     ("messages[1].content[0].text", "claude-opus-5-5", "claude")]
    text = new["messages"][1]["content"][0]["text"]
    assert "You are powered by the model named Claude. The exact model ID is claude." in text
    assert new["messages"][0] == original["messages"][0]  # the user's own message is never touched
    assert rules.restore(new, None, [e.to_json() for e in stripped])[0] == original


@pytest.mark.parametrize("text, expected", [
    ("You are powered by the model named Opus 4.8 (1M context). The exact model ID is claude-opus-4-8[1m].\n - x",
     "You are powered by the model named Claude. The exact model ID is claude.\n - x"),
    ("Co-Authored-By: Claude Opus 4.8 (1M context) <noreply@anthropic.com>",
     "Co-Authored-By: Claude <noreply@anthropic.com>"),
    ("Co-Authored-By: Claude Sonnet 5 <noreply@anthropic.com>\nCo-Authored-By: Claude <noreply@anthropic.com>",
     "Co-Authored-By: Claude <noreply@anthropic.com>\nCo-Authored-By: Claude <noreply@anthropic.com>"),
    ("You are powered by the model named Claude. The exact model ID is claude.", None),  # already canonical
    ("Model IDs - Opus 4.8: 'claude-opus-4-8', Haiku 4.5: 'claude-haiku-4-5'.", None),  # stable text: kept
    ("Co-Authored-By: Jane Doe <jane@example.com>", None),  # a person, not the model
])
def test_rewrites(text, expected):
    new, changes = model_identity.rewrites(text)
    assert new == (text if expected is None else expected)
    assert bool(changes) == (expected is not None)
    back = new
    for c in reversed(changes):
        back = back[:c.start] + c.old + back[c.start + len(c.new):]
    assert back == text


def test_rewrite_entries_round_trip_through_capture_json():
    body = {"system": "You are powered by the model named Opus 4.8. The exact model ID is claude-opus-4-8.",
            "tools": [{"name": "Bash", "description": "Co-Authored-By: Claude Opus 4.8 <noreply@anthropic.com>"}],
            "messages": [{"role": "user", "content": "Co-Authored-By: Claude Opus 4.8 <noreply@anthropic.com>"}]}
    original = copy.deepcopy(body)
    new, stripped = RULES.apply(body)
    assert body == original
    assert new["messages"] is body["messages"]  # user messages untouched (not even copied)
    assert new["tools"][0]["description"] == "Co-Authored-By: Claude <noreply@anthropic.com>"
    entries = [rules.stripped_from_json(json.loads(json.dumps(e.to_json()))) for e in stripped]
    assert entries == stripped and [e.kind for e in entries] == ["rewrite"] * 3
    assert rules.restore(new, None, [e.to_json() for e in stripped])[0] == original
