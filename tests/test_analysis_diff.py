"""warmturn.analysis.diff / analysis.divergence: exact changed paths, divergence in chars and tokens, poisons, patterns."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from warmturn.analysis.__main__ import main
from warmturn.analysis.diff import diff_payloads, diff_records, pattern_for
from warmturn.analysis.divergence import divergence, flatten_prompt, load_tokenizer
from warmturn.analysis.load import load_records

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "tests" / "fixtures" / "captures"
REAL = ROOT / "tests" / "fixtures" / "claude_code"

BASE = {
    "model": "m", "max_tokens": 64, "stream": True,
    "system": [{"type": "text", "text": "You are helpful."}, {"type": "text", "text": "Rules: be brief."}],
    "tools": [{"name": "Read", "description": "read", "input_schema": {"type": "object"}},
              {"name": "Bash", "description": "bash", "input_schema": {"type": "object"}}],
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _paths(changes):
    return {c.path for c in changes}


def test_diff_finds_exactly_the_changed_paths():
    a = copy.deepcopy(BASE)
    b = copy.deepcopy(BASE)
    b["system"][1]["text"] = "Rules: be very brief."
    b["tools"][1]["description"] = "run bash"
    b["messages"].append({"role": "assistant", "content": "hello"})
    b["max_tokens"] = 32
    changes = diff_payloads(a, b, {"x-stainless-retry-count": "0", "content-length": "10", "host": "h"},
                            {"x-stainless-retry-count": "1", "content-length": "99", "host": "h"})
    assert _paths(changes) == {"system[1].text", "tools[1].description", "messages[1]", "max_tokens",
                               "headers.x-stainless-retry-count"}
    by = {c.path: c for c in changes}
    assert by["messages[1]"].expected and by["messages[1]"].region == "messages"
    assert not by["system[1].text"].expected and by["system[1].text"].region == "prefix"
    assert by["max_tokens"].region == "params" and (by["max_tokens"].old, by["max_tokens"].new) == (64, 32)
    assert by["headers.x-stainless-retry-count"].poison == "volatile_header"


def test_identical_requests_have_no_changes():
    assert diff_payloads(BASE, copy.deepcopy(BASE), {"a": "1"}, {"a": "1"}) == []


def test_reordered_tools_is_one_named_change():
    b = copy.deepcopy(BASE)
    b["tools"].reverse()
    changes = diff_payloads(BASE, b)
    assert [(c.path, c.action, c.poison) for c in changes] == [("tools", "reordered", "tools_reordered")]
    assert changes[0].old == ["Read", "Bash"] and changes[0].new == ["Bash", "Read"]


def test_cache_control_move_and_content_shape_named():
    a = copy.deepcopy(BASE)
    a["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]
    b = copy.deepcopy(BASE)
    b["messages"] = [{"role": "user", "content": "hi"}]
    changes = diff_payloads(a, b)
    assert [(c.path, c.poison) for c in changes] == [("messages[0].content", "content_shape")]
    c = copy.deepcopy(a)
    del c["messages"][0]["content"][0]["cache_control"]
    changes = diff_payloads(a, c)
    assert [(c.path, c.poison) for c in changes] == [("messages[0].content[0].cache_control", "cache_control_moved")]


def test_constructed_capture_pairs_and_volatile_table():
    rep = diff_records(load_records([CAPTURES / "constructed_volatile.jsonl"]).records)
    assert [p.relation for p in rep.pairs] == ["turn", "turn"]
    assert set(rep.pairs[0].paths) == {"system[1].text", "headers.x-stainless-retry-count", "messages[1]", "messages[2]"}
    assert set(rep.pairs[1].paths) == {"system[1].text", "messages[3]", "messages[4]"}
    table = {v.path: v for v in rep.volatile}
    assert set(table) == {"system[1].text", "messages[+]"}
    # a header is outside the prompt: listed apart, as harmless to the KV cache
    assert [(v.path, v.in_prompt) for v in rep.outside] == [("headers.x-stainless-retry-count", False)]
    assert table["system[1].text"].count == 2 and table["system[1].text"].region == "prefix"
    assert (table["system[1].text"].example_old, table["system[1].text"].example_new) == ("7", "8")
    assert table["messages[+]"].count == 4 and table["messages[+]"].expected
    assert rep.poisons == {"volatile_header": 1, "date": 1}


def test_divergence_at_char_level():
    a = copy.deepcopy(BASE)
    b = copy.deepcopy(BASE)
    b["system"][1]["text"] = "Rules: be kind."
    d = divergence(a, b)
    expected = len("You are helpful.\n" + "Rules: be ")
    assert d.shared_chars == expected
    assert d.where == "system[1]" and d.in_prefix
    # 40 characters either side of the divergence, newlines shown as ⏎
    assert d.snippet_a == 'You are helpful.⏎Rules: be ⟦brief.⏎{"name":"Read","description":"rea'
    assert d.snippet_b == 'You are helpful.⏎Rules: be ⟦kind.⏎{"name":"Read","description":"read'
    assert d.chars_a == len(flatten_prompt(a).text) and d.chars_b == len(flatten_prompt(b).text)
    # a message appended: everything before it is shared, the divergence is in messages
    c = copy.deepcopy(BASE)
    c["messages"].append({"role": "assistant", "content": "yo"})
    d = divergence(BASE, c)
    assert d.shared_chars == len(flatten_prompt(BASE).text) and d.where == "messages[1]" and not d.in_prefix
    assert divergence(BASE, copy.deepcopy(BASE)).where == "identical"


def test_string_and_block_content_render_the_same():
    b = copy.deepcopy(BASE)
    b["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert flatten_prompt(BASE).text == flatten_prompt(b).text


def test_divergence_at_token_level_with_the_default_tokenizer(tokenizer):
    stable = "You are a careful assistant. Always answer in one short sentence."
    a = {"system": [{"type": "text", "text": stable + " Alpha team owns this repository."}], "messages": []}
    b = {"system": [{"type": "text", "text": stable + " Beta team owns this repository."}], "messages": []}
    d = divergence(a, b, tokenizer)
    assert d.shared_chars == len(stable) + 1  # the space before Alpha/Beta is shared
    # byte-level BPE splits before " Alpha"/" Beta": the shared tokens are exactly those of the stable text
    assert d.shared_tokens == len(tokenizer.encode(stable))
    assert d.tokens_a == len(tokenizer.encode(flatten_prompt(a).text))
    ta, tb = tokenizer.encode(flatten_prompt(a).text), tokenizer.encode(flatten_prompt(b).text)
    assert ta[: d.shared_tokens] == tb[: d.shared_tokens] and ta[d.shared_tokens] != tb[d.shared_tokens]


def test_billing_block_named_between_main_agent_and_subagent_real_payloads():
    rep = diff_records(load_records([REAL / "subagent_round.jsonl"]).records)
    relations = sorted(p.relation for p in rep.pairs)
    assert relations == ["subagent", "turn"]
    sub = next(p for p in rep.pairs if p.relation == "subagent")
    billing = [c for c in sub.changes if c.poison == "billing_block"]
    assert [c.path for c in billing] == ["system[0].text"]
    assert "cc_is_subagent=true" in billing[0].new
    # the prefix diverges inside the billing block, right after the shared "cc_version=2.1.197."
    assert sub.divergence.where == "system[0]"
    assert sub.divergence.shared_chars == len("x-anthropic-billing-header: cc_version=2.1.197.")
    # the subagent's own tool set is one named change, not a cascade of index shifts
    assert [c.path for c in sub.changes if c.path == "tools"] == ["tools"]
    assert rep.poisons["billing_block"] == 1


def test_billing_block_named_across_turns_when_cch_rotates():
    res = load_records([CAPTURES / "constructed_ab.jsonl"])
    rep = diff_records(res.records)
    off_turns = [p for p in rep.pairs if p.arm == "normalize-off" and p.relation == "turn"]
    assert len(off_turns) == 4
    for p in off_turns:
        assert [c.path for c in p.changes if c.poison == "billing_block"] == ["system[0].text"]
        assert p.divergence.where == "system[0]"
    on_turns = [p for p in rep.pairs if p.arm == "normalize-on" and p.relation == "turn"]
    # forwarded bodies: nothing changes in the prefix once the block is stripped
    assert all(not p.divergence.in_prefix for p in on_turns) and len(on_turns) == 4
    assert rep.stripped == {"system_block: ^x-anthropic-billing-header:": 6}
    # the original bodies (stripped content restored) show the block again
    rep_orig = diff_records(res.records, original=True)
    on_orig = [p for p in rep_orig.pairs if p.arm == "normalize-on" and p.relation == "turn"]
    assert all("system[0].text" in p.paths for p in on_orig)


def _addon_strip(body, patterns):
    """Run the addon's own normalizer (warmturn/rules.py) with extra fragment patterns."""
    from warmturn.rules import DEFAULT_VOLATILE_FRAGMENTS, Rules

    return Rules.make(fragments=[*DEFAULT_VOLATILE_FRAGMENTS, *patterns]).apply(body)


def test_suggested_patterns_remove_the_volatile_content_in_the_addon_normalizer():
    res = load_records([CAPTURES / "constructed_volatile.jsonl"])
    rep = diff_records(res.records)
    patterns = [s.pattern for s in rep.suggestions]
    assert patterns and all(s.option == "volatile_fragments" for s in rep.suggestions)
    assert rep.suggestions[0].set_arg.startswith("--set ")
    bodies = [r["body"] for r in res.records]
    stripped = [_addon_strip(b, patterns) for b in bodies]
    texts = [s[0]["system"][1]["text"] for s in stripped]
    assert texts[0] == texts[1] == texts[2]
    for t in texts:
        assert not re.search(r"counter: \d|2026-11-2\d", t)
    assert "Platform: linux" in texts[0] and "End of notes." in texts[0]
    # and every removal is recorded as a fragment by the addon
    assert all(any(e.kind == "fragment" for e in s[1]) for s in stripped)
    # after normalization the prefixes are identical: a prefix cache can reuse all of system
    d = divergence(stripped[0][0], stripped[2][0])
    assert not d.in_prefix


def test_model_identity_turns_need_no_pattern_the_addon_canonicalizes_them():
    """2.1.197's "(1M context)"/[1m] in a first -p turn and not on --continue: the addon's default
    model-identity rule equalizes it, so diff suggests nothing and says so."""
    res = load_records([REAL / "full_two_turns.jsonl"])
    rep = diff_records(res.records)
    assert len(rep.pairs) == 1 and rep.pairs[0].divergence.where == "system[2]"
    assert rep.suggestions == [] and rep.canonical_identity == ["system[2].text", "tools[1].description"]
    assert rep.unsuggested == []
    a, b = (_addon_strip(r["body"], [])[0] for r in res.records)
    assert a["system"] == b["system"]
    # the Bash tool's Co-Authored-By line is canonicalized by the addon's default identity rule: the
    # system+tools prefix is equal, the turns first differ after it, in the messages
    assert a["tools"] == b["tools"] and divergence(a, b).where.startswith("messages")


def test_pattern_for_returns_none_when_nothing_differs_by_line():
    assert pattern_for("same", "same") is None


def test_cli_json_and_text(capsys):
    assert main(["diff", str(CAPTURES / "constructed_volatile.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["pairs"]) == 2 and out["load"]["bad_lines"] == 0
    assert out["poisons"]["date"]["count"] == 1
    assert any(s["set_arg"].startswith("--set volatile_fragments=") or "volatile_fragments=" in s["set_arg"]
               for s in out["suggestions"])
    assert main(["diff", str(CAPTURES / "constructed_ab.jsonl"), "--session", "sess-off-1"]) == 0
    text = capsys.readouterr().out
    assert "billing_block" in text and "2 bad lines skipped" in text
    assert "\x1b[" not in text  # no colours when not a TTY


def test_cli_tokenizer_errors_cleanly(capsys, tmp_path):
    assert main(["diff", str(CAPTURES / "constructed_volatile.jsonl"), "--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_terminal_output_is_aligned_and_coloured_only_when_asked():
    from warmturn.analysis.term import Style, format_diff

    rep = diff_records(load_records([CAPTURES / "constructed_volatile.jsonl"]).records)
    plain = format_diff(rep, Style(enabled=False))
    lines = plain.splitlines()
    head = lines[1]
    col = head.index("diverges at")
    rows = lines[2:4]
    assert all(r[col:].startswith("system[1]") for r in rows)
    assert "\x1b[" not in plain
    coloured = format_diff(rep, Style(enabled=True))
    assert "\x1b[31msystem[1]\x1b[0m" in coloured  # prefix divergence in red
    assert re_strip(coloured) == plain


def re_strip(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# --------------------------------------------------------------------------- real captures, issue 11

REAL_ALL = [REAL / n for n in ("small_two_turns.jsonl", "tool_round.jsonl", "full_two_turns.jsonl",
                               "full_tool_round.jsonl", "subagent_round.jsonl")]


def _system_texts(records) -> list[str]:
    return [b.get("text", "") for r in records for b in (r["body"] or {}).get("system") or [] if isinstance(b, dict)]


def test_no_suggestion_from_different_sessions_stable_text_or_matching_a_stable_line():
    """2.1.197: `--system-prompt "You are a terse assistant."` in one session and "... terse coding
    assistant." in another once gave `You are a terse [^\\n]*?(?=\\.)`, which deletes instructions."""
    res = load_records(REAL_ALL)
    rep = diff_records(res.records)
    assert rep.suggestions
    for s in rep.suggestions:
        assert not s.pattern.startswith("You are"), s.pattern
    # no pattern removes anything from a line every request of a session shares with the others
    from warmturn.analysis.sessions import group

    for recs in group(res.records).values():
        texts = [_system_texts([r]) for r in recs]
        stable = set.intersection(*({line for t in ts for line in t.splitlines()} for ts in texts))
        for s in rep.suggestions:
            if len(recs) > 1:  # on a stable line a pattern may cut a per-machine value (a path), never words
                cut = [m.group(0) for line in stable for m in re.finditer(s.pattern, line) if m.group(0)]
                if s.poison == "model_identity":  # only the model's name variant, not the sentence around it
                    assert set(cut) <= {" (1M context)", "[1m]"}, (s.pattern, cut[:3])
                else:
                    assert all(re.fullmatch(r"[^\s`]*/[^\s`]*|[0-9a-f-]+", c) for c in cut), (s.pattern, cut[:3])
    # the different --system-prompt texts are named as such, not patterned
    assert any("different" in u for u in rep.unsuggested)


def test_cross_session_patterns_generalize_the_path_instead_of_one_machines_value():
    # derived from two sessions with HOME /tmp/rec/home_full and /tmp/rec/home_fulltool …
    rep = diff_records(load_records([REAL / "full_two_turns.jsonl", REAL / "full_tool_round.jsonl"]).records)
    cross = [s for s in rep.suggestions if s.poison in ("environment", "path")]
    assert cross and all("home_full" not in s.pattern and "/tmp/rec" not in s.pattern for s in cross)
    # … and they remove a third machine's paths too: the subagent recording ran under another HOME
    third = next(r["body"] for r in load_records([REAL / "subagent_round.jsonl"]).records if r["body"])
    text = third["system"][2]["text"]
    home = re.search(r"memory at `(/tmp/rec/[^/]+)/", text).group(1)
    assert "home_full" not in home
    out, entries = _addon_strip(third, [s.pattern for s in cross])
    assert all(home not in b["text"] for b in out["system"])
    cut = [e for e in entries if e.kind == "fragment"]
    texts = {e.text for e in cut}
    assert {f"{home}/.claude/projects/-tmp-rec-home-agent-work/memory/", f"{home}/work"} <= texts
    assert texts <= {f"{home}/.claude/projects/-tmp-rec-home-agent-work/memory/", f"{home}/work", "true", "false"}
    assert {e.path for e in cut} == {"system[1].text"}  # the main prompt (the billing block dropped before it)
    # what stays different is named, with the fix for the rest of the environment (git status)
    assert any("exclude-dynamic-system-prompt-sections" in u for u in rep.unsuggested)


def test_fields_and_headers_outside_the_prompt_are_listed_apart_as_harmless():
    rep = diff_records(load_records(REAL_ALL).records)
    outside = {v.path for v in rep.outside}
    assert {"metadata.user_id", "headers.x-claude-code-session-id", "max_tokens"} <= outside
    assert all(not v.in_prompt for v in rep.outside)
    prompt = {v.path for v in rep.volatile}
    assert not prompt & outside
    assert all(p.startswith(("system", "tools", "messages")) for p in prompt)
    assert not any("cache_control" in p for p in prompt)
    from warmturn.analysis.term import Style, format_diff

    text = format_diff(rep, Style(enabled=False))
    assert "harmless to the KV cache" in text


def test_session_prefix_and_divergences_labelled_by_session(capsys):
    records = load_records([REAL / "full_two_turns.jsonl", REAL / "small_two_turns.jsonl"]).records
    rep = diff_records(records, session="000e094a-43e")  # the 12 characters the table prints
    assert {p.session for p in rep.pairs if p.relation == "turn"} == {"000e094a-43ee-49f8-be53-53c0b30efef8"}
    with pytest.raises(ValueError, match="no session starts with"):
        diff_records(records, session="ffffffff")
    assert main(["diff", str(REAL / "full_two_turns.jsonl"), "--session", "000e094a-43e"]) == 0
    text = capsys.readouterr().out
    assert "session 000e094a-43e main turn 1→2: prefix diverges at system[2]" in text
    assert "full_two_turns.jsonl:" not in text  # no flow ids
    assert main(["diff", str(REAL / "full_two_turns.jsonl"), "--session", "nope"]) == 2


def test_a_path_given_a_pattern_is_not_also_reported_without_one(capsys):
    rep = diff_records(load_records([CAPTURES / "constructed_volatile.jsonl"]).records)
    assert rep.suggestions and rep.unsuggested == []
    rep = diff_records(load_records([REAL / "full_two_turns.jsonl", REAL / "full_tool_round.jsonl"]).records)
    sugg = {s.path for s in rep.suggestions}
    assert sugg == {"system[2].text"}
    # the path is listed once more only for what its patterns cannot reach (git status), with that reason
    assert [u for u in rep.unsuggested if u.startswith("system[2].text")] == [
        "system[2].text (per-session environment left (e.g. git status): claude "
        "--exclude-dynamic-system-prompt-sections moves it out of the system prompt)"]


# --------------------------------------------------------------------------- Claude Code 2.1.332

REAL_332 = ROOT / "tests" / "fixtures" / "claude_code_2.1.332"


def test_2_1_332_first_party_headers_and_fields_are_harmless_and_get_no_pattern():
    """Intercepted (first-party) 2.1.332: new per-request headers and diagnostics are outside the prompt."""
    rep = diff_records(load_records([REAL_332 / "intercept_p_small.jsonl"]).records, original=True)
    outside = {v.path for v in rep.outside}
    assert {"headers.x-claude-code-prompt-id", "diagnostics.previous_message_id"} <= outside
    prompt = {v.path: v for v in rep.volatile}
    # in the prompt: only the billing block (stripped by default), history re-shaped, and growth
    assert {v.poison for v in prompt.values() if not v.expected} <= {"billing_block", "content_shape"}
    assert prompt["system[0].text"].poison == "billing_block"
    assert rep.suggestions == [] and rep.unsuggested == []
    # what the backend saw: nothing in the prompt's prefix changed within the session
    fwd = diff_records(load_records([REAL_332 / "intercept_p_small.jsonl"]).records)
    assert all(not p.divergence.in_prefix for p in fwd.pairs)


def test_2_1_332_interactive_safeguards_are_outside_the_prompt():
    rep = diff_records(load_records([REAL_332 / "interactive_small.jsonl"]).records, original=True)
    assert any(v.path.startswith("safeguards") for v in rep.outside)
    assert not any(v.path.startswith("safeguards") for v in rep.volatile)


def test_2_1_332_memory_path_generalized_across_homes_and_environment_found_in_messages():
    rep = diff_records(load_records([REAL_332 / "p_full_two_homes.jsonl"]).records)
    (session,) = [p for p in rep.pairs if p.relation == "session"]
    assert session.divergence.where == "system[2]"  # the memory path ~3.7K characters in
    by_path = {c.path: c for c in session.changes}
    assert by_path["system[2].text"].poison == "path"
    # 2.1.332 keeps the rest of the per-session text in messages[1], after the system+tools prefix
    assert by_path["messages[1].content[0].text"].poison == "environment"
    (s,) = rep.suggestions
    assert s.pattern == "(?<=a persistent file-based memory at `)[^\\s`]+" and "home_" not in s.pattern
    assert rep.unsuggested == []
    # the pattern removes a third machine's memory path too (the addon's own capture of another HOME) …
    third = next(r["original"] for r in load_records([REAL_332 / "p_full.jsonl"]).records if r["kind"] == "messages")
    assert "home_p_full" in third["system"][2]["text"]
    out, entries = _addon_strip(third, [s.pattern])
    cut = [e for e in entries if e.kind == "fragment"]
    assert len(cut) == 1 and cut[0].text.endswith("/memory/") and "home_p_full" in cut[0].text
    assert "You have a persistent file-based memory at `` This directory" not in out["system"][1]["text"]
    assert "file-based memory at ``." in out["system"][1]["text"]  # only the path went
    # … and with it the two homes' system prompts and tools are byte-identical
    recs = load_records([REAL_332 / "p_full_two_homes.jsonl"]).records  # home_a turns 1-2, then home_b's
    a, b = recs[0]["body"], recs[2]["body"]
    na, nb = _addon_strip(a, [s.pattern])[0], _addon_strip(b, [s.pattern])[0]
    assert na["system"] == nb["system"] and na["tools"] == nb["tools"]
    assert divergence(na, nb).where.startswith("messages")


def test_environment_hint_holds_for_both_client_versions():
    old = diff_records(load_records([REAL / "full_two_turns.jsonl", REAL / "full_tool_round.jsonl"]).records)
    new = diff_records(load_records([REAL_332 / "p_full_two_homes.jsonl"]).records)
    env_old = {c.path for p in old.pairs for c in p.changes if c.poison == "environment"}
    env_new = {c.path for p in new.pairs for c in p.changes if c.poison == "environment"}
    assert env_old == {"system[2].text"} and env_new == {"messages[1].content[0].text"}
    from warmturn.analysis.diff import POISONS

    hint = POISONS["environment"]
    assert "2.1.197 ends system[2]" in hint and "2.1.332" in hint and "messages[1]" in hint


def test_title_requests_are_side_requests_outside_turn_numbering():
    """Real interactive 2.1.197: a title request beside each typed prompt is no turn of the session."""
    from warmturn.analysis.load import flows_frame

    records = load_records([REAL / "interactive_title_capture.jsonl"]).records
    rep = diff_records(records)
    assert rep.side == {"title": 2}
    assert [(p.relation, p.a_turn, p.b_turn) for p in rep.pairs] == [("turn", 1, 2)]
    assert not rep.pairs[0].divergence.in_prefix  # turn 2 extends turn 1: the titles do not break the pair
    df = flows_frame(records)
    titles = df[df["side"] == "title"]
    assert len(titles) == 2 and titles["turn"].isna().all() and set(titles["cls"]) == {"side"}
    assert df[df["side"].isna()]["turn"].tolist() == [1, 2]


def test_content_shape_is_harmless_and_not_listed_as_a_poison(capsys):
    """Issue 21: content_shape was listed under "Known cache poisons" while its own text calls it harmless
    (the server renders a string and the same text as one block identically)."""
    from warmturn.analysis.diff import HARMLESS
    from warmturn.analysis.term import Style, format_diff

    assert "content_shape" in HARMLESS
    rep = diff_records(load_records([ROOT / "tests" / "fixtures" / "claude_code_2.1.332" / "p_read.jsonl"]).records)
    shapes = [c for p in rep.pairs for c in p.changes if c.poison == "content_shape"]
    assert shapes and "content_shape" not in rep.prompt_poisons()
    text = format_diff(rep, Style(False))
    assert "content_shape (harmless)" in text
    assert "content_shape ×" not in text


def test_session_rows_show_the_servers_tokens_and_cache_reads():
    """Issue 21: a session row said 8/3,245 shared (0%) where the server reused 70%: it compared the raw JSON
    (system first) with the previous session's first request only. With the server's view, the row gives the
    two prompts' shared tokens as the server renders them and what the request really read from the cache."""
    from warmturn.analysis.whatif import Served, load_renderer

    cc = ROOT / "tests" / "fixtures" / "claude_code_2.1.332"
    recs = load_records([cc / "interactive_small.jsonl", cc / "intercept_p_small.jsonl"]).records
    rep = diff_records(recs, served=Served(*load_renderer("default")))
    rows = {(p.relation, p.session[:8], p.b_turn): p for p in rep.pairs}
    s = rows[("session", "f85caf8b", 1)]
    assert (s.divergence.shared_chars, s.divergence.chars_b) == (8, 1103)  # raw JSON: 1%
    assert (s.shared_tokens, s.prompt_tokens) == (5, 320)  # the two first prompts, rendered
    assert (s.cache_read, s.cache_read_source) == (80, "reported")  # what the server read: 25%
    t = rows[("turn", "c5583bcd", 2)]
    assert (t.shared_tokens, t.prompt_tokens, t.cache_read) == (317, 380, 364)  # the reply is reused too
    # without usage in the capture (a raw request log), the read is whatif's prediction
    raw = diff_records(load_records([REAL / "small_two_turns.jsonl"]).records, served=Served(*load_renderer("default")))
    assert (raw.pairs[0].cache_read_source, raw.pairs[0].shared_tokens, raw.pairs[0].cache_read) == ("predicted", 164, 164)


def test_a_clock_in_the_system_prompt_gets_one_pattern_for_the_whole_token():
    """A real run whose system prompt carries `Session clock: 00:01:20.778 since start.`: the pairs differ in
    different digits (00.182→21.236, 00:54.960→01:20.778…). One pattern takes the whole time token, anchored on
    its label, instead of one per pair anchored on the digits that happened to stay; and the session pair,
    equal once it is applied, is not reported as a different prompt."""
    rep = diff_records(load_records([CAPTURES / "walkthrough_before.jsonl"]).records)
    assert [s.pattern for s in rep.suggestions] == [r"(?<=Session clock: )[\w.:/-]+"]
    assert rep.unsuggested == []
