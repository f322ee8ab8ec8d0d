"""Normalization rules (warmturn/rules.py) on real Claude Code payloads, plus properties."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES
from warmturn import protocol, rules

CC = FIXTURES / "claude_code"


def recorded_bodies():
    out = [json.loads((CC / "full_first_turn.json").read_text())["body"]]
    for name in ("small_two_turns", "tool_round", "subagent_round"):
        for line in (CC / f"{name}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["method"] == "POST" and isinstance(rec["body"], dict) and "system" in rec["body"]:
                out.append(rec["body"])
    return out


RULES = rules.Rules.make()


def restore_body(body, stripped):
    return rules.restore(body, None, stripped)[0]

BILLING_VARIANTS = [
    "x-anthropic-billing-header: cc_version=2.1.197.3f2; cc_entrypoint=cli;",
    "x-anthropic-billing-header: cc_version=2.1.197.191; cc_entrypoint=sdk-cli;",
    "x-anthropic-billing-header: cc_version=2.1.197.3f2; cc_entrypoint=cli; cch=8a0c1;",
    "x-anthropic-billing-header: cc_version=2.1.197.5b8; cc_entrypoint=sdk-cli; cc_is_subagent=true;",
    "x-anthropic-billing-header: cc_version=2.1.197.5b8; cc_entrypoint=cli; cch=00f3e; cc_is_subagent=true;",
    "x-anthropic-billing-header: cc_version=3.0.0; cc_entrypoint=vscode; cc_new_field=1;",
]


MODEL_NAME = r"(Claude )?(Opus|Sonnet|Haiku|Fable) [\d.]+( \(1M context\))?|claude-[a-z0-9-]+(\[1m\])?"


@pytest.mark.parametrize("identity", [False, True])
def test_recorded_payloads_lose_exactly_the_billing_block(identity):
    """Real requests: the billing block goes; with the identity rule (the default) the model's name and id
    inside its two sentences become Claude/claude too, and nothing else changes."""
    import re

    bodies = recorded_bodies()
    assert len(bodies) >= 5
    renamed = 0
    for body in bodies:
        original = copy.deepcopy(body)
        assert body["system"][0]["text"].startswith("x-anthropic-billing-header:")
        new, stripped = rules.Rules.make(identity=identity).apply(body)
        assert body == original, "input must not be mutated"
        assert stripped[0].kind == "system_block" and stripped[0].block == original["system"][0]
        rewrites = stripped[1:]
        assert all(e.kind == "rewrite" for e in rewrites) and (identity or not rewrites)
        for e in rewrites:  # only a model name or id, replaced by the canonical one
            assert re.fullmatch(MODEL_NAME, e.text) and e.replacement in ("Claude", "claude"), e
        renamed += len(rewrites)
        if not rewrites:
            assert new["system"] == original["system"][1:]
            assert {k: v for k, v in new.items() if k != "system"} == \
                {k: v for k, v in original.items() if k != "system"}
        assert restore_body(new, stripped) == original
    assert renamed >= 3 if identity else renamed == 0  # full_first_turn: the model line (name, id) and Bash's Co-Authored-By


@pytest.mark.parametrize("text", BILLING_VARIANTS)
def test_every_billing_variant_is_dropped(text):
    body = {"system": [{"type": "text", "text": text}, {"type": "text", "text": "You are terse."}], "messages": []}
    new, stripped = RULES.apply(body)
    assert new["system"] == [{"type": "text", "text": "You are terse."}]
    assert stripped[0].index == 0 and stripped[0].pattern == "^x-anthropic-billing-header:"


def test_billing_info_fields():
    info = protocol.parse_billing(BILLING_VARIANTS[4])
    assert info.present and info.is_subagent
    assert info.fields == {"cc_version": "2.1.197.5b8", "cc_entrypoint": "cli", "cch": "00f3e", "cc_is_subagent": "true"}
    assert not protocol.parse_billing("You are Claude Code").present
    sub = [b for b in recorded_bodies() if "cc_is_subagent=true" in b["system"][0]["text"]]
    assert sub and protocol.find_billing(sub[0]).is_subagent


def test_fragment_inside_a_kept_block_and_string_system():
    text = "Intro\nx-anthropic-billing-header: cc_version=2.1.1.abc; cch=12345;\nRest of prompt"
    body = {"system": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}], "messages": []}
    new, stripped = RULES.apply(body)
    assert new["system"] == [{"type": "text", "text": "Intro\nRest of prompt", "cache_control": {"type": "ephemeral"}}]
    assert stripped[0].kind == "fragment" and stripped[0].path == "system[0].text" and stripped[0].offset == 6
    assert restore_body(new, stripped) == body

    body2 = {"system": "x-anthropic-billing-header: cc_version=1; \nBe brief.", "messages": []}
    new2, stripped2 = RULES.apply(body2)
    assert new2["system"] == "Be brief." and restore_body(new2, stripped2) == body2


def test_custom_patterns_and_multiple_fragments():
    r = rules.Rules.make([r"^Session started at"], [r"\d{4}-\d\d-\d\d"], [])
    body = {"system": [{"type": "text", "text": "Session started at 10:00"},
                       {"type": "text", "text": "Today 2026-11-22, tomorrow 2026-11-23."}], "messages": [1]}
    new, stripped = r.apply(body)
    assert new["system"] == [{"type": "text", "text": "Today , tomorrow ."}]
    assert [e.kind for e in stripped] == ["system_block", "fragment", "fragment"]
    assert restore_body(new, stripped) == body


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="volatile_patterns"):
        rules.Rules.make(["(unclosed"], [], [])
    with pytest.raises(ValueError, match="volatile_fragments"):
        rules.Rules.make([], ["[z-a]"], [])
    with pytest.raises(ValueError, match="header name"):
        rules.Rules.make([], [], ["bad header"])


def test_headers():
    kept, stripped = RULES.apply_headers(
        [("X-Stainless-Retry-Count", "0"), ("x-claude-code-session-id", "s"), ("x-client-request-id", "r1"),
         ("x-api-key", "k")])
    assert kept == [("x-claude-code-session-id", "s"), ("x-api-key", "k")]
    assert [e.name for e in stripped] == ["X-Stainless-Retry-Count", "x-client-request-id"]


def test_prefix_stats_equal_across_sessions_after_stripping():
    a = {"system": [{"type": "text", "text": BILLING_VARIANTS[0]}, {"type": "text", "text": "P"}], "tools": [{"name": "x"}]}
    b = {"system": [{"type": "text", "text": BILLING_VARIANTS[1]}, {"type": "text", "text": "P"}], "tools": [{"name": "x"}]}
    assert rules.prefix_stats(a)[0] != rules.prefix_stats(b)[0]
    na, nb = RULES.apply(a)[0], RULES.apply(b)[0]
    assert rules.prefix_stats(na) == rules.prefix_stats(nb)
    assert rules.prefix_stats(na)[1] == 1 + len('[{"name":"x"}]')


# ---- property: nothing else changes ----------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), c, max_size=3)),
                          max_leaves=8)
plain_text = st.text(max_size=40).filter(lambda s: "x-anthropic-billing-header:" not in s)
block = st.fixed_dictionaries({"type": st.just("text"), "text": plain_text},
                              optional={"cache_control": st.just({"type": "ephemeral"})})
other_block = st.fixed_dictionaries({"type": st.sampled_from(["image", "document"]), "source": json_value})


@st.composite
def payloads(draw):
    system = draw(st.lists(st.one_of(block, other_block), max_size=5))
    n_billing = draw(st.integers(0, 2))
    for _ in range(n_billing):
        pos = draw(st.integers(0, len(system)))
        system.insert(pos, {"type": "text", "text": draw(st.sampled_from(BILLING_VARIANTS))})
    body = {"model": draw(st.sampled_from(["claude-opus-4-8", "claude-haiku-4-5-20251001"])),
            "system": system if draw(st.booleans()) else draw(plain_text),
            "messages": draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                               "content": st.one_of(plain_text, st.lists(block, max_size=2))}),
                                      max_size=4)),
            "tools": draw(st.lists(st.dictionaries(st.text(max_size=6), json_value, max_size=3), max_size=3))}
    body.update(draw(st.dictionaries(st.sampled_from(["max_tokens", "temperature", "metadata", "thinking", "stream"]),
                                     json_value, max_size=3)))
    return body, n_billing


@settings(max_examples=300, deadline=None)
@given(payloads())
def test_nothing_else_changes(case):
    body, n_billing = case
    original = copy.deepcopy(body)
    new, stripped = RULES.apply(body)
    assert body == original
    if isinstance(original["system"], str) or n_billing == 0:
        assert new is body and stripped == []
        return
    assert len(stripped) == n_billing and all(e.kind == "system_block" for e in stripped)
    assert new["system"] == [b for b in original["system"] if "x-anthropic-billing-header:" not in str(b.get("text", ""))]
    assert {k: v for k, v in new.items() if k != "system"} == {k: v for k, v in original.items() if k != "system"}
    assert list(new) == list(original), "key order kept"
    assert restore_body(new, stripped) == original
    assert json.loads(rules.encode_body(new)) == new
