"""analysis whatif: KV sizes from real configs, the cache model's rules, and the prediction checked
against what the embedded server reported on recorded captures."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES
from warmturn.analysis.__main__ import main
from warmturn.analysis.budget import budget_curve, flattens_at
from warmturn.analysis.cachemodel import CacheModel
from warmturn.analysis.kvsize import KVCost, cost_from_config, parse_bytes, preset_cost
from warmturn.analysis.load import load_records
from warmturn.analysis.whatif import (
    Options,
    Settings,
    Tokenizing,
    Variant,
    load_renderer,
    make_rules,
    messages_in_order,
    prepare_variant,
    whatif,
)

CC332 = FIXTURES / "claude_code_2.1.332"
# One mitmdump + embedded server recorded these in this order (record.sh's default scenario list),
# so replayed together they start from the same cache state the server had.
ONE_RUN = [CC332 / f"{n}.jsonl" for n in ("p_small", "p_full", "p_full_exclude", "p_read", "interactive_small",
                                           "interactive_full", "intercept_p_small")]
SAMPLE = FIXTURES.parent.parent / "warmturn" / "analysis" / "sample" / "sample-capture.jsonl"
TITLE = FIXTURES / "claude_code" / "interactive_title_capture.jsonl"
# three conversations at once (tests/fixtures/captures/record_walkthrough.py --concurrent): the engine
# batches them and the two late ones wait for the first's shared 747 tokens (dedup)
CONCURRENT = FIXTURES / "captures" / "concurrent.jsonl"
WALKTHROUGH = [FIXTURES / "captures" / "walkthrough_before.jsonl", FIXTURES / "captures" / "walkthrough_after.jsonl"]


# --------------------------------------------------------------------------- KV sizes


@pytest.mark.parametrize("name, per_token, window, window_per_token, constant", [
    # 2 (K and V) x layers x KV heads x head dim x 2 bytes (bfloat16)
    ("Llama-3.1-8B", 2 * 32 * 8 * 128 * 2, 0, 0, 0),
    ("Qwen3-Coder-30B-A3B", 2 * 48 * 4 * 128 * 2, 0, 0, 0),
    # 12 full + 12 sliding layers, window 128
    ("gpt-oss-20b", 2 * 12 * 8 * 64 * 2, 128, 2 * 12 * 8 * 64 * 2, 0),
    # every 6th of 62 layers global (10), 52 sliding with a 1,024-token window
    ("Gemma-3-27B", 2 * 10 * 16 * 128 * 2, 1024, 2 * 52 * 16 * 128 * 2, 0),
    # every 4th of 48 layers full attention (12); 36 Gated DeltaNet layers: a 32x128x128 state and a
    # (4-1) x (2*16*128 + 32*128) conv state each, whatever the length
    ("Qwen3-Next-80B", 2 * 12 * 2 * 256 * 2, 0, 0, 36 * (32 * 128 * 128 + 3 * (2 * 16 * 128 + 32 * 128)) * 2),
])
def test_presets_size_the_cache_from_their_published_configs(name, per_token, window, window_per_token, constant):
    c = preset_cost(name)
    assert (c.per_token, c.window, c.window_per_token, c.constant) == (per_token, window, window_per_token, constant)
    assert c.trimmable == (window_per_token == 0 and constant == 0)


def test_window_layers_stop_growing_at_the_window_and_dtype_scales():
    g = preset_cost("gpt-oss-20b")
    assert g.nbytes(100) == 100 * 24576 + 100 * 24576
    assert g.nbytes(10_000) == 10_000 * 24576 + 128 * 24576
    assert preset_cost("Llama-3.1-8B", "8bit").per_token == 2 * 32 * 8 * 128
    assert preset_cost("Llama-3.1-8B", "float32").per_token == 2 * 32 * 8 * 128 * 4


def test_the_default_models_config_gives_the_servers_measured_bytes_per_token(model_dir):
    # server/cache.py's kv_bytes_per_token measures 46,080 for SmolLM2-135M in float32
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cost_from_config(cfg, "float32").per_token == 46080


def test_parse_bytes():
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("1.5GiB") == 3 << 29
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")


# --------------------------------------------------------------------------- the cache model

ONE = KVCost("test", 1)  # one byte per token: budgets read as token counts


def test_trimmable_reuses_any_prefix_and_caps_at_all_but_the_last_token():
    c = CacheModel(ONE, 1000)
    assert c.fetch([1, 2, 3, 4], 0) == 0
    c.store([1, 2, 3, 4, 9, 9], (), 1)  # prompt + answer
    assert c.fetch([1, 2, 3, 4, 9, 9, 5], 2) == 6
    assert c.fetch([1, 2, 3, 7], 3) == 3  # trimmed back to the shared part
    assert c.fetch([1, 2, 3, 4, 9, 9], 4) == 5  # an exact repeat still computes its last token
    assert (c.counters.hits, c.counters.misses) == (3, 1)


def test_checkpoints_policy_resumes_only_at_an_entrys_end_or_marks():
    c = CacheModel(KVCost("state", 1, constant=100), 10_000, policy="checkpoints", min_checkpoint=2)
    c.store([1, 2, 3, 4, 5, 6], (3,), 0, marks=(3, 5))  # system+tools end at 3, prompt end - 1 at 5
    assert c.fetch([1, 2, 3, 4, 9, 9], 1) == 3  # shares 4 tokens: resumes at the mark at 3
    assert c.fetch([1, 2, 3, 4, 5, 7, 8], 2) == 5
    assert c.fetch([1, 2, 3, 4, 5, 6, 7], 3) == 6  # the whole entry
    assert c.bytes == (6 + 100 + 2 * 100) + (3 + 100)  # entry + its two marks' state, and the checkpoint
    t = CacheModel(ONE, 1000, min_checkpoint=2)
    t.store([1, 2, 3, 4, 5, 6], (3,), 0)
    assert t.fetch([1, 2, 3, 4, 9, 9], 1) == 4  # plain KV: any prefix


def test_a_superseded_entry_hands_its_marks_and_end_to_the_new_one():
    c = CacheModel(KVCost("state", 1, constant=10), 10_000, policy="checkpoints", min_checkpoint=2)
    c.store([1, 2, 3, 4], (), 0, marks=(2,))
    c.store([1, 2, 3, 4, 5, 6, 7, 8], (), 1, marks=(6,))  # extends the first: it is dropped
    assert len(c) == 1
    assert c.fetch([1, 2, 3, 4, 5, 0, 0], 2) == 4  # the old entry's end, now a mark of the new one
    assert c.fetch([1, 2, 3, 0], 3) == 2
    for n in range(9, 20):  # at most 8 marks: the earliest and the latest
        c.store(list(range(1, n + 1)), (), n, marks=(n - 1,))
    (entry,) = c._entries.values()
    assert sorted(entry.marks) == [2, 12, 13, 14, 15, 16, 17, 18]


def test_lru_eviction_under_the_byte_budget_keeps_the_recent_entry():
    c = CacheModel(ONE, 10)
    c.store([1] * 6, (), 0)
    c.store([2] * 6, (), 1)  # 12 bytes > 10: the older entry goes
    assert c.counters.evictions == 1 and c.bytes == 6
    assert c.fetch([1] * 7, 2) == 0 and c.fetch([2] * 7, 3) == 6
    c.store([3] * 20, (), 4)  # larger than the whole budget: not stored at all
    assert c.counters.rejected == 1 and c.fetch([3] * 21, 5) == 0


def test_slots_cap_conversation_entries_but_not_checkpoints():
    c = CacheModel(ONE, 1000, slots=1, min_checkpoint=2)
    c.store([1, 1, 5, 5], (2,), 0)
    c.store([1, 1, 6, 6], (2,), 1)
    assert c.counters.evictions == 1
    assert c.fetch([1, 1, 5, 5, 0], 2) == 2  # the first conversation is gone, its checkpoint is not
    assert c.fetch([1, 1, 6, 6, 0], 3) == 4


def test_checkpoints_come_back_from_disk_after_eviction():
    c = CacheModel(ONE, 8, disk_bytes=100, min_checkpoint=2)
    c.store([1, 1, 1, 1, 5, 5], (4,), 0)  # checkpoint [1,1,1,1] also written to disk
    c.store([2] * 8, (), 1)  # evicts everything else from memory
    assert c.fetch([1, 1, 1, 1, 7, 7], 2) == 4
    assert c.counters.disk_loads == 1


def test_a_new_checkpoint_branching_from_a_stored_one_stores_the_shared_part():
    c = CacheModel(ONE, 1000, min_checkpoint=2)
    c.store([1, 2, 3, 4, 9], (4,), 0)
    c.store([1, 2, 3, 5, 9], (4,), 1)  # parts at 3: [1, 2, 3] becomes a checkpoint of its own
    c.store([7, 7, 7], (), 2)
    assert c.fetch([1, 2, 3, 6, 6], 3) == 3
    assert sum(e.checkpoint for e in c._entries.values()) == 3


# --------------------------------------------------------------------------- rules variants


def test_rules_variants_turn_each_rule_off_separately():
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.1.abc;"},
                       {"type": "text", "text": "You are powered by the model named Opus 4.8 (1M context). "
                                                "The exact model ID is claude-opus-4-8[1m]."}]}
    on = make_rules().apply(body)[0]
    assert len(on["system"]) == 1 and "Opus" not in on["system"][0]["text"]
    no_billing = make_rules(["billing_block"]).apply(body)[0]
    assert len(no_billing["system"]) == 2 and "Opus" not in no_billing["system"][1]["text"]
    no_identity = make_rules(["model_identity"]).apply(body)[0]
    assert len(no_identity["system"]) == 1 and "Opus 4.8" in no_identity["system"][0]["text"]
    with pytest.raises(ValueError):
        make_rules(["nope"])


# --------------------------------------------------------------------------- against reality


@pytest.fixture(scope="module")
def renderer():
    return load_renderer("default")


def _run(files, renderer, **kw):
    ren, path = renderer
    return whatif(load_records(files).records, Options(suggestions=False, **kw), ren, path)


@pytest.mark.parametrize("files", [ONE_RUN, [SAMPLE], [TITLE], [CONCURRENT], WALKTHROUGH[:1], WALKTHROUGH[1:]],
                         ids=["claude-code-2.1.332", "sample", "title", "concurrent", "clock", "clock-pattern"])
def test_prediction_matches_the_servers_cache_reads_within_2_percent_per_session(files, renderer):
    out = _run(files, renderer)
    check = out["check"]
    assert check, "these captures carry the server's usage"
    for c in check:
        assert c["prompt_mismatches"] == 0, c  # rendered like the server: every prompt length exact
        assert c["error"] <= 0.02, c


def test_claude_code_run_numbers(renderer):
    """The Claude Code 2.1.332 run: per session, what the server reported and what whatif predicts."""
    check = {c["session"][:8]: c for c in _run(ONE_RUN, renderer)["check"]}
    assert {k: (c["requests"], c["prompt_tokens"], c["reported_read"], c["predicted_read"])
            for k, c in check.items()} == {
        "9df0d0e7": (2, 699, 365, 365),  # p_small: turn 2 reads 365 of 381
        # p_read: 8 requests, each stopped by max_tokens. The engine of 2026-11-30 fed the 256th token back;
        # today's feeds it only when the request runs batched, which is what whatif models: 1 token each
        "2c199817": (8, 17216, 15759, 15752),
        "c5583bcd": (2, 697, 369, 369),  # interactive_small
        # intercept_p_small: the first request read 80 tokens the capture cannot explain (predicted 68), and
        # 4 more max_tokens stops
        "f85caf8b": (5, 4762, 4310, 4294),
    }


def test_variants_none_and_rules_on_the_intercepted_session(renderer):
    """First-party interception: the billing block's cch= changes on every request, so without the
    rules almost nothing is reused; with them, every continuation is warm."""
    out = _run([CC332 / "intercept_p_small.jsonl"], renderer, ram_bytes=8 << 30)
    v = {x["name"]: x for x in out["variants"]}
    assert set(v) == {"none", "rules"}
    assert v["none"]["hit_rate"] < 0.05 < 0.8 < v["rules"]["hit_rate"]
    assert v["none"]["prompt_tokens"] - v["rules"]["prompt_tokens"] == 5 * 142  # the stripped billing block
    assert v["rules"]["prefilled_tokens"] == v["rules"]["prompt_tokens"] - v["rules"]["read_tokens"]


def test_a_small_budget_evicts_and_the_curve_flattens(renderer):
    ren, _path = renderer
    msgs = messages_in_order(load_records([CC332 / "p_read.jsonl"]).records)
    prepared = prepare_variant(msgs, Variant("as-captured", lambda r: r.get("body")), Tokenizing(ren, 8192), False)
    cost = KVCost("smol", 46080)
    curve = budget_curve(prepared, Settings(cost, 0), points=8)
    rates = [h for _, h in curve]
    assert rates == sorted(rates) and rates[0] < rates[-1]
    at = flattens_at(curve)
    assert at is not None and next(h for b, h in curve if b == at) >= rates[-1] - 0.01


def test_cli_json_has_the_documented_shape(renderer, capsys):
    assert main(["whatif", str(CC332 / "p_small.jsonl"), "--json", "--no-suggestions", "--ram", "1G",
                 "--prefill-rate", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [v["name"] for v in out["variants"]]
    assert names == ["none", "rules"]
    rules_v = out["variants"][1]
    assert set(rules_v) >= {"name", "hit_rate", "prefilled_tokens", "evictions", "sessions"}
    assert rules_v["sessions"][0]["session"].startswith("9df0d0e7")
    assert rules_v["seconds_saved"] == round(rules_v["read_tokens"] / 100, 2)
    assert out["check"][0]["predicted_read"] == out["check"][0]["reported_read"] == 365


# --------------------------------------------------------------------------- Anthropic's cache (passthrough)
# The repository holds no response recorded from the real Anthropic API (every usage field in
# tests/fixtures comes from the embedded server, vLLM or a stub recorder), so these tests give
# real Claude Code request bodies, or literal ones, usage written the way Anthropic's documented
# cache would answer, and check the verdicts and numbers compare() computes from them.


def _api(body: dict, t: float, read: int, creation: int, inp: int, rid: str) -> dict:
    return {"id": rid, "session": "s", "kind": "messages", "backend": "passthrough", "body": body,
            "t": {"request": t}, "usage": {"input_tokens": inp, "cache_read_input_tokens": read,
                                           "cache_creation_input_tokens": creation}}


def _body(system: str, turns: list[str], model: str = "claude-opus-4-8", ttl: str | None = None) -> dict:
    cc = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    msgs = []
    for i, text in enumerate(turns):
        msgs.append({"role": "user", "content": [{"type": "text", "text": text,
                                                  **({"cache_control": cc} if i == len(turns) - 1 else {})}]})
        if i < len(turns) - 1:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]})
    return {"model": model, "max_tokens": 8, "system": [{"type": "text", "text": system, "cache_control": cc}],
            "messages": msgs}


def test_anthropic_verdicts_hit_expired_too_short_and_unexplained():
    from warmturn.analysis.anthropic import compare, summarize

    sys_ = "S" * 8000
    recs = [
        _api(_body(sys_, ["q1"]), 0.0, 0, 2000, 3, "cold"),
        _api(_body(sys_, ["q1", "q2"]), 60.0, 2000, 12, 3, "hit"),  # reads turn 1's prefix (2,000 tokens, exact)
        _api(_body(sys_, ["q1", "q2", "q3"]), 60.0 + 301, 0, 2024, 3, "expired"),  # 5 min 1 s later
        _api(_body(sys_, ["q1", "q2", "q3", "q4"]), 400.0, 0, 2036, 3, "evicted"),  # should have hit, did not
        _api(_body("tiny", ["hello"]), 410.0, 0, 0, 12, "short"),  # ~10 tokens: under 1,024
        _api({"model": "claude-opus-4-8", "max_tokens": 8, "system": sys_,  # no cache_control at all
              "messages": [{"role": "user", "content": "q1"}]}, 420.0, 0, 0, 2003, "plain"),
        _api(_body(sys_, ["q1", "q2", "q3", "q4", "q5"], ttl="1h"), 4000.0, 0, 2048, 3, "long gap"),
    ]
    v = {x.id: x for x in compare(recs)}
    assert (v["cold"].verdict, v["cold"].why) == ("cold", "the first request seen")
    assert (v["hit"].verdict, v["hit"].predicted_read, v["hit"].predicted_creation) == ("hit", 2000, 12)
    assert v["hit"].why == "reads the prefix up to messages[0].content[0]"
    assert v["expired"].verdict == "expired" and v["expired"].why.startswith("the prefix up to messages[2].content[0] "
                                                                           "was last used 301 s ago (TTL 300 s)")
    assert v["evicted"].verdict == "unexpected_miss" and v["evicted"].predicted_read == 2024
    assert v["short"].verdict == "too_short" and "1,024-token minimum" in v["short"].why
    assert v["plain"].verdict == "no_breakpoint"
    assert v["long gap"].verdict == "expired"  # 1h TTL on the new request, but what it would read was written with 5m
    s = summarize(list(v.values()))
    assert s["verdicts"] == {"cold": 1, "hit": 1, "expired": 2, "unexpected_miss": 1, "too_short": 1,
                             "no_breakpoint": 1}
    assert (s["reported_read"], s["predicted_read"]) == (2000, 4024)


def test_anthropic_real_claude_code_bodies_part_at_the_model_name_in_the_bash_tool():
    """Claude Code 2.1.197's first -p turn and its --continue turn (real request bodies, not normalized):
    the Bash tool's Co-Authored-By line names the model differently, so on Anthropic's cache (tools first)
    the second turn shares only tools[0] and must write everything again."""
    from warmturn.analysis.anthropic import compare

    recs = [r for r in load_records([FIXTURES / "claude_code" / "full_two_turns.jsonl"]).records
            if r["kind"] == "messages"]
    recs[0]["usage"] = {"input_tokens": 3, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 19000}
    recs[1]["usage"] = {"input_tokens": 3, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 19030}
    first, second = compare(recs)
    assert first.verdict == "cold" and second.verdict == "cold"
    assert second.why == "parts from the closest earlier request at tools[1] (1 blocks shared)"
    # with the addon's rules (canonical model identity) the second turn reads the first one's prefix
    rules_on = [dict(r, body=make_rules().apply(r["body"])[0]) for r in recs]
    rules_on[1]["usage"] = {"input_tokens": 3, "cache_read_input_tokens": 19000, "cache_creation_input_tokens": 30}
    assert [x.verdict for x in compare(rules_on)] == ["cold", "hit"]


def test_whatif_compares_passthrough_captures_and_keeps_them_out_of_the_local_check(renderer, capsys):
    sys_ = "S" * 8000
    recs = [_api(_body(sys_, ["q1"]), 0.0, 0, 2000, 3, "a"), _api(_body(sys_, ["q1", "q2"]), 30.0, 0, 2012, 3, "b")]
    ren, path = renderer
    out = whatif(recs, Options(suggestions=False, ram_bytes=1 << 30), ren, path)
    assert "check" not in out  # Anthropic's usage is not the local server's
    assert out["anthropic"]["summary"]["verdicts"] == {"cold": 1, "unexpected_miss": 1}
    from warmturn.analysis.term import Style, format_whatif

    text = format_whatif(out, Style(False))
    assert "Anthropic's own cache (passthrough)" in text and "unexpected_miss" in text


def test_a_suggested_rule_predicted_from_one_run_matches_the_run_recorded_with_it(renderer):
    """docs/whatif-walkthrough.md: two real runs of the same conversations, the second recorded with the
    pattern `analysis diff` suggested for the first. whatif's rules+<that pattern> variant, computed from
    the first run only, predicts what the server reported in the second, token for token."""
    captures = FIXTURES / "captures"
    before = load_records([captures / "walkthrough_before.jsonl"]).records
    ren, path = renderer
    out = whatif(before, Options(), ren, path)
    names = [v["name"] for v in out["variants"]]
    assert names == ["none", "rules", "rules+pattern@system[0].text"]
    added = out["variants"][2]
    assert added["set_arg"] == "--set 'volatile_fragments=(?<=Session clock: )[\\w.:/-]+'"
    assert [round(v["hit_rate"], 3) for v in out["variants"]] == [0.030, 0.030, 0.830]
    after = whatif(load_records([captures / "walkthrough_after.jsonl"]).records, Options(suggestions=False), ren, path)
    reported = [(c["prompt_tokens"], c["reported_read"]) for c in after["check"]]
    predicted = [(s["prompt_tokens"], s["read_tokens"]) for s in added["sessions"]]
    assert reported == predicted == [(2351, 1556), (2351, 2348)]


def test_concurrent_conversations_wait_for_the_shared_prefix(renderer):
    check = _run([CONCURRENT], renderer)["check"]
    assert [(c["reported_read"], c["predicted_read"]) for c in check] == [(763, 763), (1510, 1510), (1510, 1510)]



# --------------------------------------------------------------------------- families that cannot be cut back
# The same walkthrough conversations recorded through the addon with the real server serving tiny random-weight
# models of a hybrid (qwen3_next: a Gated DeltaNet layer, then attention) and a sliding-window family
# (gemma3_text, window 64): warmturn.server.tinymodels, rebuilt here (deterministic) for their config and tokenizer.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from warmturn.server.tinymodels import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {f: load_renderer(str(build_tiny(f, root / f))) for f in ("qwen3_next", "gemma3_text")}


@pytest.mark.parametrize("family, capture, reads", [
    ("qwen3_next", "family_qwen3_next.jsonl", [(1518, 1518), (2306, 2306)]),
    # a clock line 29 tokens in: a plain KV cache would read those 29 tokens on every turn; a hybrid
    # model has no state kept there (its first mark is the end of system+tools), so it reads nothing
    ("qwen3_next", "family_qwen3_next_clock.jsonl", [(0, 0), (0, 0)]),
    # random weights wrote an answer whose tokens do not re-tokenize as they decode: 8 tokens off in one turn
    ("gemma3_text", "family_gemma3_text.jsonl", [(1532, 1540), (2324, 2324)]),
])
def test_window_and_hybrid_families_match_the_server(tiny, family, capture, reads):
    ren, path = tiny[family]
    out = whatif(load_records([FIXTURES / "captures" / capture]).records, Options(suggestions=False), ren, path)
    assert out["settings"]["policy"] == "checkpoints"
    assert [(c["reported_read"], c["predicted_read"]) for c in out["check"]] == reads
    assert all(c["prompt_mismatches"] == 0 and c["error"] <= 0.02 for c in out["check"])


def test_a_rule_predicted_for_a_hybrid_family_matches_the_run_with_it(tiny):
    ren, path = tiny["qwen3_next"]
    captures = FIXTURES / "captures"
    before = whatif(load_records([captures / "family_qwen3_next_clock.jsonl"]).records, Options(), ren, path)
    added = before["variants"][-1]
    assert added["name"] == "rules+pattern@system[0].text"
    after = whatif(load_records([captures / "family_qwen3_next_clock_pattern.jsonl"]).records,
                   Options(suggestions=False), ren, path)
    assert [s["read_tokens"] for s in added["sessions"]] == [c["reported_read"] for c in after["check"]] == [1534, 2330]
