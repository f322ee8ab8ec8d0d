"""CI smoke run of the benchmark: `python -m warmturn.bench --smoke` drives the real stack (the embedded
server and mlx_lm.server on the default model, mitmdump with the addon, the analysis report)
with one warm turn per arm, plus the concurrent replay's fan-out and decode scenarios against
the embedded server, so the bench does not rot. Times are printed, never asserted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from itertools import pairwise

import pytest

from tests.conftest import ROOT

ARMS = ["1-stable", "2-rotating-off", "3-rotating-on", "4-no-cache", "5-mlx_lm.server", "6-restart", "7-direct"]
PROXIED = [a for a in ARMS if a != "7-direct"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("bench") / "results"
    proc = subprocess.run([sys.executable, "-m", "warmturn.bench", "--smoke", "--model", str(model_dir), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=540)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _csv(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.model
def test_every_arm_has_numbers_in_table_and_csv(smoke_run):
    out, stdout = smoke_run
    summary = {r["arm"]: r for r in _csv(out / "summary.csv")}
    assert sorted(summary) == sorted(ARMS)
    for arm in ARMS:
        s = summary[arm]
        assert s["errors"] == "0", (arm, s)
        assert s["requests"] == "2", (arm, s)
        assert float(s["cold_ttft_s"]) > 0, (arm, s)
        if arm != "6-restart":  # its two requests are the prime and the first turn after restart
            assert float(s["warm_ttft_median_s"]) > 0, (arm, s)
        line = next(line for line in stdout.splitlines() if line.startswith(f"| {arm} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3] != "n/a", line  # cold TTFT printed


@pytest.mark.model
def test_cache_behaviour_per_arm(smoke_run):
    """Not timing: what each arm is for shows in the tokens the servers report as reused."""
    out, _ = smoke_run
    rows = _csv(out / "requests.csv")
    warm = {r["arm"]: r for r in rows if r["phase"] == "warm"}
    read = {a: int(r["cache_read_input_tokens"] or 0) for a, r in warm.items()}
    # normalization strips the rotating billing block: the warm turn reuses the prefix. Without it
    # the server (tools rendered first, the default --prefix-order) still reuses the tool
    # descriptions, but everything from the billing block on is recomputed.
    # (In the smoke workload the tools are ~60% of the prefix: 314 of ~500 tokens.)
    assert 0 < read["2-rotating-off"] < 0.8 * read["3-rotating-on"]
    assert read["1-stable"] > read["2-rotating-off"] and abs(read["1-stable"] - read["3-rotating-on"]) < 50
    assert read["4-no-cache"] == 0
    restart = next(r for r in rows if r["arm"] == "6-restart" and r["phase"] == "restart")
    assert int(restart["cache_read_input_tokens"]) > 0  # the checkpoint came back from --cache-dir


@pytest.mark.model
def test_captures_ratios_floor_and_report(smoke_run):
    out, _ = smoke_run
    labels = {json.loads(line)["label"] for line in (out / "captures.jsonl").read_text().splitlines() if line}
    assert labels == set(PROXIED)  # every proxied arm went through the addon; the direct arm did not
    ratios = {r["ratio"]: r["value"] for r in _csv(out / "ratios.csv")}
    assert float(ratios["(2)/(3) what normalization buys"]) > 0
    assert float(ratios["(3)/(7) proxy overhead"]) > 0
    floor = _csv(out / "floor.csv")
    assert floor and all(float(f["floor_ms"]) > 0 for f in floor)
    assert list((out / "report").glob("*.png")), "analysis report made no chart"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["arms"] == ARMS and not meta["skipped"]


@pytest.mark.model
def test_concurrent_replay_ran_concurrently_in_dependency_order(smoke_run):
    """The fan-out replay really overlaps requests and still respects each agent's order; the
    server's own records (queue wait, computed tokens) are found for every request."""
    out, stdout = smoke_run
    rows = _csv(out / "concurrent.csv")
    b = {r["request"]: r for r in rows if r["scenario"] == "b"}
    assert len(b) == 13 and not any(r["error"] for r in b.values()), b
    for r in b.values():  # nobody starts before what it comes after has ended
        for dep in filter(None, r["after"].split(",")):
            assert float(r["sent_s"]) >= float(b[dep]["end_s"]) - 0.05, (r["request"], dep)
    firsts = [float(b[f"sub{i}-1"]["sent_s"]) for i in (1, 2, 3)] + [float(b["main-2"]["sent_s"])]
    assert max(firsts) - min(firsts) < 1.0  # the three subagents and the main turn start together
    assert all(r["queue_ms"] != "" and float(r["queue_ms"]) >= 0 for r in rows), "server records not matched"
    summary = {(r["scenario"], r["peer"]): r for r in _csv(out / "concurrent_summary.csv")}
    sb = summary[("b", "warmturn")]
    prompt_total = sum(int(r["prompt_tokens"]) for r in b.values())
    # computed tokens come from the server's /metrics; a prefix cache computes far less than the sum
    assert sb["prefilled_source"].startswith("server /metrics")
    assert 0 < float(sb["prefilled_tokens"]) < 0.6 * prompt_total
    assert 0 < int(sb["ideal_prefill_tokens"]) < prompt_total
    scale = summary[("scale", "warmturn")]
    assert float(scale["solo_decode_tps"]) > 0 and float(scale["streams_decode_tps"]) > 0
    assert int(scale["scale_rounds"]) == 1  # smoke: one round
    targets = _csv(out / "targets.csv")
    assert len(targets) == 16 and {t["status"] for t in targets} <= {"met", "MISSED", "n/a"}
    assert "Targets (issues 13 and 20)" in stdout and "| (b) prompt tokens prefilled |" in stdout


# --- fast checks of the bench's own logic (no model, no processes) ---------------------------

from warmturn.bench.summary import percentile, ratios, summarize_arm  # noqa: E402
from warmturn.bench.workload import billing_block, build_session, load_fixture, make_counter, with_billing  # noqa: E402


@pytest.fixture(scope="module")
def counter(model_dir):
    return make_counter(model_dir)


@pytest.mark.parametrize("target", [1000, 2000, 6000])
def test_workload_prefix_is_shrunk_to_the_target(counter, target):
    session = build_session(load_fixture(), target, counter)
    first = session.requests[0].body
    prefix = sum(counter(b["text"]) for b in first["system"]) + sum(counter(json.dumps(t)) for t in first["tools"])
    assert 0.85 * target <= prefix <= target
    assert first["tools"][0]["name"] == "Read"


def test_workload_full_size_keeps_every_recorded_tool(counter):
    session = build_session(load_fixture(), 50_000, counter)
    assert len(session.requests[0].body["tools"]) == 24
    sub = next(r for r in session.requests if r.agent == "subagent")
    assert len(sub.body["tools"]) == 17


def test_session_shape_is_claude_codes(counter):
    session = build_session(load_fixture(), 2000, counter)
    names = [r.name for r in session.requests]
    assert names == ["main-1", "main-2", "main-3", "main-4", "sub-1", "sub-2", "main-5", "main-6", "main-7"]
    mains = [r.body for r in session.requests if r.agent == "main"]
    for prev, cur in pairwise(mains):
        assert cur["system"] == prev["system"] and cur["tools"] == prev["tools"]
        assert [m["role"] for m in cur["messages"][: len(prev["messages"])]] == [m["role"] for m in prev["messages"]]
        assert len(cur["messages"]) == len(prev["messages"]) + 2
    for body in mains + [r.body for r in session.requests if r.agent == "subagent"]:
        msgs = body["messages"]
        for i, m in enumerate(msgs):  # every tool_use is answered by a tool_result in the next message
            if m["role"] == "assistant":
                for b in m["content"]:
                    if b["type"] == "tool_use":
                        nxt = msgs[i + 1]["content"]
                        assert any(x.get("tool_use_id") == b["id"] for x in nxt if isinstance(x, dict))
        marked = [b for m in msgs if isinstance(m["content"], list) for b in m["content"] if "cache_control" in b]
        assert len(marked) == 1  # only the newest user block carries cache_control, as Claude Code sends it
    sub = [r for r in session.requests if r.agent == "subagent"]
    assert sub[0].headers["x-claude-code-agent-id"] and sub[0].body["system"] != mains[0]["system"]
    assert sub[0].headers["x-claude-code-session-id"] == session.requests[0].headers["x-claude-code-session-id"]


def test_rotating_billing_block_is_what_the_addon_strips():
    import random
    import re

    from warmturn.rules import DEFAULT_VOLATILE_PATTERNS

    rng = random.Random(1)
    texts = {billing_block(rng, subagent=False)["text"] for _ in range(20)}
    assert len(texts) == 20  # a new one per request
    for t in texts:
        assert re.match(r"^x-anthropic-billing-header: cc_version=2\.1\.197\.[0-9a-f]{3}; cc_entrypoint=cli; "
                        r"cch=[0-9a-f]{5};$", t)
        assert any(re.search(p, t, re.M) for p in DEFAULT_VOLATILE_PATTERNS)
    assert billing_block(rng, subagent=True)["text"].endswith(" cc_is_subagent=true;")


def test_with_billing_does_not_touch_the_request(counter):
    import random

    req = build_session(load_fixture(), 1000, counter).requests[0]
    before = json.dumps(req.body)
    body = with_billing(req, random.Random(0))
    assert body["system"][1:] == req.body["system"] and json.dumps(req.body) == before


def test_summary_figures_from_literal_rows():
    def row(arm, name, agent, turn, phase, ttft, prompt=None, read=None, err=None):
        return {"arm": arm, "rep": 0, "request": name, "agent": agent, "turn": turn, "phase": phase,
                "ttft_ms": ttft, "prompt_tokens": prompt, "cache_read_input_tokens": read, "error": err}

    rows = [row("3-rotating-on", "main-1", "main", 1, "cold", 20000.0, 2000, 0),
            row("3-rotating-on", "main-2", "main", 2, "warm", 1000.0, 2100, 2000),
            row("3-rotating-on", "main-3", "main", 3, "warm", 2000.0, 2200, 2100),
            row("3-rotating-on", "main-4", "main", 4, "warm", 3000.0, 2300, 2000),
            row("3-rotating-on", "main-5", "main", 5, "warm", 1100.0, None, None),
            row("3-rotating-on", "main-6", "main", 6, "warm", None, err="boom"),
            row("2-rotating-off", "main-2", "main", 2, "warm", 5000.0, 2100, 0)]
    floors = {("main-2", 0): 500.0, ("main-3", 0): 1000.0}
    s3 = summarize_arm("3-rotating-on", "t", rows, floors)
    assert s3["requests"] == 6 and s3["errors"] == 1
    assert s3["cold_ttft_s"] == 20.0
    assert s3["warm_ttft_median_s"] == pytest.approx(1.55)
    assert s3["warm_ttft_p90_s"] == pytest.approx(percentile([1.0, 2.0, 3.0, 1.1], 90))
    assert s3["hit_ratio"] == pytest.approx(6100 / 6600)
    assert s3["warm_over_floor"] == 2.0
    assert s3["turn5_over_turn2"] == pytest.approx(1.1)
    s2 = summarize_arm("2-rotating-off", "t", rows)
    r = {x["ratio"]: x["value"] for x in ratios({"3-rotating-on": s3, "2-rotating-off": s2}, 0.75)}
    assert r["(2)/(3) what normalization buys"] == pytest.approx(5.0 / 1.55)
    assert r["(3) cold/warm"] == pytest.approx(20.0 / 1.55)
    assert r["(4)/(3) no cache vs cache"] is None  # arm not run: n/a, never a made-up number
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 90) is None


def test_repeats_count_each_request_once_as_its_median():
    """Three repeats of two warm requests: one slow sample of main-3 (rep 2) must not become the
    p90; each request's figure is its median over the repeats, against its floors' median."""
    def row(name, rep, ttft):
        return {"arm": "3-rotating-on", "rep": rep, "request": name, "agent": "main", "turn": int(name[-1]),
                "phase": "warm", "ttft_ms": ttft, "prompt_tokens": 100, "cache_read_input_tokens": 90,
                "error": None}

    rows = [row("main-2", 0, 1000.0), row("main-2", 1, 1100.0), row("main-2", 2, 1050.0),
            row("main-3", 0, 2000.0), row("main-3", 1, 2100.0), row("main-3", 2, 3000.0)]
    floors = {("main-2", 0): 1000.0, ("main-2", 1): 1000.0, ("main-2", 2): 1000.0,
              ("main-3", 0): 2000.0, ("main-3", 1): 1900.0, ("main-3", 2): 2100.0}
    s = summarize_arm("3-rotating-on", "t", rows, floors)
    assert s["warm_ttft_median_s"] == pytest.approx((1.05 + 2.1) / 2)  # medians 1050 and 2100 ms
    assert s["warm_ttft_p90_s"] == pytest.approx(percentile([1.05, 2.1], 90))
    assert s["warm_over_floor"] == pytest.approx((1.05 + 1.05) / 2)  # 1050/1000 and 2100/2000
    assert s["warm_over_floor_p90"] == pytest.approx(1.05)  # the 3000 ms sample stays one of three


def test_peer_template_renders_the_same_prompt_as_warmturns_server(model_dir, counter, tmp_path):
    """The peers must prefill what our server prefills: the tools-aware copy of SmolLM2's
    template, fed the addon's OpenAI translation, gives the server's token count (±0.2%);
    the model's own template drops the tools."""
    from transformers import AutoTokenizer

    from warmturn.addons.openai_translate import to_openai_request
    from warmturn.bench.peer_model import peer_model_dir, template_handles_tools
    from warmturn.server.render import Renderer
    from warmturn.server.wire import parse_messages_request

    assert not template_handles_tools(model_dir)
    peer = peer_model_dir(model_dir, tmp_path)
    assert peer != model_dir and template_handles_tools(peer)
    assert (peer / "model.safetensors").resolve() == (model_dir / "model.safetensors").resolve()
    ours = Renderer(AutoTokenizer.from_pretrained(str(model_dir)))
    native = AutoTokenizer.from_pretrained(str(model_dir))
    theirs = AutoTokenizer.from_pretrained(str(peer))
    for req in build_session(load_fixture(), 1000, counter).requests:
        n_ours = len(ours.render(parse_messages_request(req.body)).tokens)
        o = to_openai_request(req.body, "m")

        def n(tok, o=o):
            text = tok.apply_chat_template(o["messages"], tools=o.get("tools"), tokenize=False,
                                           add_generation_prompt=True)
            return len(tok.encode(text, add_special_tokens=False))

        assert abs(n(theirs) - n_ours) <= max(3, n_ours // 500), req.name
        if req.name == "main-1":  # (SmolLM2's own template cannot even render tool_calls history)
            assert n(native) < n_ours - 300  # without the copy the peers would skip the tool schemas
