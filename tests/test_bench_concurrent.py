"""The concurrent replay's own logic, without a model or a process: the scenarios' shapes
(built from the recorded Claude Code payloads), the prefix-tree ideal, the figures and the
targets table computed from literal rows. The smoke run (tests/test_bench_smoke.py) drives
the replay against the real server."""

from __future__ import annotations

import json

import pytest

from warmturn.bench.concurrent import metric_delta, parse_prometheus, select_peers, vllm_prefill_from_log
from warmturn.bench.replay import bodies_with_billing
from warmturn.bench.scenarios import (
    build_scenarios,
    decode_streams,
    fan_out,
    interactive_start,
    parallel_sessions,
    scale_round,
)
from warmturn.bench.targets import decode_rate, distinct_prefix_tokens, summarize_run, targets
from warmturn.bench.workload import load_fixture, make_counter


@pytest.fixture(scope="module")
def counter(model_dir):
    return make_counter(model_dir)


@pytest.fixture(scope="module")
def fixture():
    return load_fixture()


def test_interactive_start_pairs_the_recorded_title_request_with_the_first_turn(fixture, counter):
    sc = interactive_start(fixture, 1000, counter, max_tokens=16, title_max_tokens=24)
    title, first = sc.node("title").request.body, sc.node("main-1").request.body
    assert sc.node("title").after == () and sc.node("main-1").after == ()  # in flight together
    assert 0 < sc.node("main-1").delay_s < 3 and sc.node("title").delay_s == 0  # the recorded order
    assert title["tools"] == [] and title["output_config"]["format"]["type"] == "json_schema"
    assert fixture["main"]["first_prompt"] in title["messages"][0]["content"][0]["text"]
    assert title["messages"][0]["content"][0]["text"].startswith("<session>\n")
    assert first["tools"] and title["max_tokens"] == 24 and first["max_tokens"] == 16
    assert title["temperature"] == first["temperature"] == 0.0
    alone = interactive_start(fixture, 1000, counter, 16, 24, alone=True)
    assert [n.name for n in alone.nodes] == ["main-1"] and alone.nodes[0].request.body == first


def test_fan_out_siblings_share_one_prefix_and_run_beside_the_main_turn(fixture, counter):
    sc = fan_out(fixture, 1000, counter, max_tokens=8)
    subs = [n for n in sc.nodes if n.role == "subagent"]
    assert len(subs) == 9  # 3 agents x (first turn + 2 tool rounds)
    firsts = [n for n in subs if n.request.turn == 1]
    assert all(n.after == ("main-1",) for n in firsts) and sc.node("main-2").after == ("main-1",)
    prefixes = {json.dumps([n.request.body["system"], n.request.body["tools"]]) for n in subs}
    assert len(prefixes) == 1  # one shared subagent prefix
    assert len({json.dumps(n.request.body["messages"][0]) for n in firsts}) == 3  # own prompts
    assert len({n.request.headers["x-claude-code-agent-id"] for n in firsts}) == 3
    last = sc.node("main-4")
    assert set(last.after) == {"main-3", "sub1-3", "sub2-3", "sub3-3"}
    notices = last.request.body["messages"][-1]["content"]
    assert len(notices) == 3 and all("<task-notification>" in b["text"] for b in notices)
    launch = sc.node("main-2").request.body["messages"][-2]["content"]
    assert [b["input"]["run_in_background"] for b in launch if b["type"] == "tool_use"] == [True] * 3
    for n in subs[1:3]:  # each tool round answers the previous tool_use
        msgs = n.request.body["messages"]
        uses = [b["id"] for b in msgs[-2]["content"] if b["type"] == "tool_use"]
        assert [b["tool_use_id"] for b in msgs[-1]["content"]] == uses


def test_parallel_sessions_are_independent_chains_with_one_system_and_tools(fixture, counter):
    sc = parallel_sessions(fixture, 1000, counter, max_tokens=8)
    assert len(sc.nodes) == 16
    heads = [n for n in sc.nodes if not n.after]
    assert len(heads) == 4
    assert len({json.dumps([n.request.body["system"], n.request.body["tools"]]) for n in heads}) == 1
    assert len({json.dumps(n.request.body["messages"][0]) for n in heads}) == 4
    assert len({n.request.headers["x-claude-code-session-id"] for n in heads}) == 4


def test_billing_blocks_are_the_same_for_every_server_and_only_where_claude_code_sends_one(fixture, counter):
    import random

    sc = build_scenarios(["b", "scale"], fixture, 600, counter, 8, 8, 16)
    b1 = bodies_with_billing(sc[0], random.Random(1))
    assert b1 == bodies_with_billing(sc[0], random.Random(1))
    assert all(body["system"][0]["text"].startswith("x-anthropic-billing-header:") for body in b1.values())
    assert b1["sub1-1"]["system"][0]["text"].endswith("cc_is_subagent=true;")
    assert "system" not in bodies_with_billing(sc[1], random.Random(1))["solo-1"]
    assert sc[0].nodes[0].request.body["system"][0] == b1["main-1"]["system"][1]  # the request is untouched


def test_distinct_prefix_tokens_counts_each_shared_prefix_once():
    assert distinct_prefix_tokens([]) == 0
    assert distinct_prefix_tokens([[1, 2, 3]]) == 3
    shared = [1, 2, 3, 4]
    # three siblings: the shared prefix once plus each one's own suffix, whatever the order
    assert distinct_prefix_tokens([shared + [7], shared + [8, 9], shared + [5]]) == 4 + 1 + 2 + 1
    assert distinct_prefix_tokens([[1, 2], [1, 2, 3], [4]]) == 4  # a prompt extending another


def _row(name, role, sent, first, end, out, **kw):
    ttft = None if first is None else (first - sent) * 1000
    return dict({"scenario": "b", "peer": "warmturn", "rep": 0, "request": name, "role": role, "sent_s": sent,
                 "first_token_s": first, "end_s": end, "ttft_ms": ttft, "output_tokens": out, "error": None}, **kw)


def test_run_figures_from_literal_rows():
    rows = [_row("main-1", "main", 0.0, 2.0, 3.0, 5, queue_ms=0.0, prompt_tokens=1000, cache_read_input_tokens=0),
            _row("sub1-1", "subagent", 3.0, 4.0, 6.0, 5, queue_ms=500.0, prompt_tokens=600,
                 cache_read_input_tokens=0),
            _row("sub2-1", "subagent", 3.0, 7.0, 9.0, 10, queue_ms=2500.0, prompt_tokens=600,
                 cache_read_input_tokens=500),
            _row("main-2", "main", 3.0, None, None, None, error="boom")]
    s = summarize_run("b", "warmturn", rows)
    assert s["requests"] == 4 and s["errors"] == 1
    assert s["ttft_p50_s"] == pytest.approx(2.0) and s["ttft_p90_s"] == pytest.approx(3.6)
    assert s["queue_p50_s"] == pytest.approx(0.5) and s["makespan_s"] == pytest.approx(9.0)
    assert s["output_tps"] == pytest.approx(20 / 9.0)
    assert s["prefilled_tokens"] == 1000 + 600 + 100 and s["prefilled_source"].startswith("response usage")
    s2 = summarize_run("b", "warmturn", rows, {"prefill_tokens_metric": 1234.0})
    assert s2["prefilled_tokens"] == 1234.0 and s2["prefilled_source"].startswith("server /metrics")


def test_decode_rate_counts_tokens_after_each_first_over_the_shared_window():
    solo = [_row("solo-1", "solo", 0.0, 1.0, 5.0, 41)]
    assert decode_rate(solo) == pytest.approx(10.0)
    together = [_row(f"s{i}", "stream", 6.0, 7.0, 11.0, 41) for i in range(4)]
    assert decode_rate(together) == pytest.approx(40.0)  # 4x: perfect scaling
    serial = [_row(f"s{i}", "stream", 6.0, 7.0 + 4 * i, 11.0 + 4 * i, 41) for i in range(4)]
    assert decode_rate(serial) == pytest.approx(160 / 16)  # one after another: no gain


def test_scale_figures_pair_each_burst_with_its_own_solo_run():
    """Round 1: 10 tok/s alone, 40 together (4x); round 2, on a machine that slowed down: 5 alone,
    15 together (3x). The warm-up counts nowhere; the figures are medians over the rounds."""
    rows = [_row("warm-up", "warm-up", 0.0, 0.5, 1.0, 41),  # 80 tok/s: would skew any figure it entered
            _row("solo-1", "solo", 0.0, 1.0, 5.0, 41),
            *[_row(f"r1-s{i}", "stream", 6.0, 7.0, 11.0, 41) for i in range(1, 5)],
            _row("solo-2", "solo", 12.0, 13.0, 21.0, 41),
            *[_row(f"r2-s{i}", "stream", 22.0, 23.0, 31.0, 31) for i in range(1, 5)]]
    fig = summarize_run("scale", "warmturn", [dict(r, scenario="scale") for r in rows])
    assert fig["scale_rounds"] == 2 and fig["streams"] == 4
    assert fig["scaling"] == pytest.approx((4.0 + 3.0) / 2)
    assert fig["solo_decode_tps"] == pytest.approx(7.5) and fig["streams_decode_tps"] == pytest.approx(27.5)
    assert [scale_round(n) for n in ("solo-3", "r12-s4", "warm-up", "main-1", "x/r2-s1")] == [3, 12, None, None, 2]


def test_the_scale_scenario_runs_its_rounds_in_order():
    sc = decode_streams(64, streams=4, rounds=2)
    after = {n.request.name: n.after for n in sc.nodes}
    assert list(after) == ["warm-up", "solo-1", "r1-s1", "r1-s2", "r1-s3", "r1-s4",
                           "solo-2", "r2-s1", "r2-s2", "r2-s3", "r2-s4"]
    assert after["solo-1"] == ("warm-up",) and after["r1-s3"] == ("solo-1",)
    assert after["solo-2"] == ("r1-s1", "r1-s2", "r1-s3", "r1-s4")  # alone: after the whole burst
    assert sc.nodes[0].request.body["max_tokens"] == 16 and sc.nodes[1].request.body["max_tokens"] == 64


def _summary(scenario, peer, **kw):
    base = {"scenario": scenario, "peer": peer, "requests": 13, "ttft_p50_s": None, "ttft_p90_s": None,
            "makespan_s": None, "first_turn_ttft_s": None, "prefilled_tokens": None, "ideal_prefill_tokens": None}
    return dict(base, **kw)


def test_targets_met_missed_and_not_measured():
    conc = [
        _summary("a-alone", "warmturn", first_turn_ttft_s=2.0), _summary("a", "warmturn", first_turn_ttft_s=2.3),
        _summary("a-alone", "vllm-mlx-cb", first_turn_ttft_s=2.0), _summary("a", "vllm-mlx-cb", first_turn_ttft_s=4.0),
        _summary("b", "warmturn", ttft_p50_s=1.0, ttft_p90_s=5.0, makespan_s=20.0, prefilled_tokens=1000.0,
                 ideal_prefill_tokens=1000),
        _summary("b", "mlx_lm.server", ttft_p50_s=2.0, ttft_p90_s=4.0, makespan_s=25.0),
        _summary("b", "vllm-mlx-cb", ttft_p50_s=1.5, ttft_p90_s=6.0, makespan_s=19.0),
        _summary("scale", "warmturn", scaling=2.9, solo_decode_tps=10.0, streams_decode_tps=29.0),
        _summary("scale", "mlx_lm.server", scaling=2.7, streams_decode_tps=30.0),
        _summary("scale", "vllm-mlx-cb", scaling=2.4, streams_decode_tps=24.0),
        # warmturn's own A/B variant is no peer: its higher ratio must not turn "met" into "MISSED"
        _summary("scale", "warmturn-no-solo", scaling=3.5, streams_decode_tps=28.0),
    ]
    seq = {"3-rotating-on": {"warm_over_floor": 1.05, "warm_over_floor_p90": 1.3, "warm_ttft_median_s": 1.0,
                             "warm_ttft_p90_s": 2.0},
           "5-vllm-mlx-cb": {"warm_ttft_median_s": 1.1, "warm_ttft_p90_s": 1.5}}
    names = ["warmturn_batch_decoding", "warmturn_queue_wait_seconds_bucket{le=\"1.0\"}", "warmturn_dedup_waits_total"]
    t = {(r["case"], r["target"]): r["status"] for r in targets(conc, seq, names)}
    assert t[("(a) first turn's TTFT", "<= 1.2x its TTFT alone")] == "met"  # 2.3 / 2.0 = 1.15
    assert t[("(b) TTFT p50", "<= both peers'")] == "met"
    assert t[("(b) TTFT p90", "<= both peers'")] == "MISSED"  # 5.0 > mlx_lm.server's 4.0
    assert t[("(b) makespan", "<= both peers'")] == "MISSED"  # 20 > vllm-mlx-cb's 19
    assert t[("(c) TTFT p50", "<= both peers'")] == "n/a"  # not run: never a made-up verdict
    assert t[("aggregate decode tok/s, 4 streams", ">= 2.8x one stream")] == "met"
    assert t[("aggregate decode tok/s, 4 streams", "scaling >= every peer's in the same run")] == "met"
    assert t[("aggregate decode tok/s, 4 streams", "tok/s >= every peer's in the same run")] == "MISSED"  # 29 < 30
    assert t[("(b) prompt tokens prefilled",
              "the shared prefix once + each sibling's own suffix (ideal)")] == "met"
    assert t[("single-stream warm TTFT (median)", "<= 1.10x the floor")] == "met"
    assert t[("single-stream warm TTFT (p90)", "<= 1.10x the floor")] == "MISSED"
    assert t[("single-stream warm TTFT (median)", "below vllm-mlx -cb")] == "met"
    assert t[("single-stream warm TTFT (p90)", "below vllm-mlx -cb")] == "MISSED"
    assert t[("/metrics", "shows batch size, queue wait and dedup counts")] == "met"
    assert targets(conc, seq, ["warmturn_queue_depth"])[-1]["status"] == "MISSED"


def test_prometheus_scrape_delta_and_vllm_mlx_log():
    before = {"/metrics": parse_prometheus("# HELP x\nwarmturn_prefill_tokens_total 100\n")}
    after = {"/metrics": parse_prometheus('warmturn_prefill_tokens_total 1600.0\nwarmturn_requests_total'
                                          '{endpoint="messages",status="200"} 3\n')}
    assert metric_delta(before, after, "warmturn_prefill_tokens_total") == 1500.0
    assert metric_delta(before, after, "nothing_total") is None
    # lines as vllm-mlx 0.6.0 --continuous-batching logs them (from a bench run's backend log)
    log = ("INFO:vllm_mlx.scheduler:[cache_fetch] request=149195cf-1b1 MISS prompt_tokens=676 time=0.000s entries=0\n"
           "INFO:vllm_mlx.server:something else\n"
           "INFO:vllm_mlx.scheduler:[cache_fetch] request=b1e6894d-48d HIT prompt_tokens=1107 cached=696 "
           "remaining=411 time=0.008s\n")
    assert vllm_prefill_from_log(log) == 676 + 411
    assert vllm_prefill_from_log("no such lines") is None


def test_peer_selection_needs_the_vllm_mlx_command():
    assert select_peers("", vllm_mlx=False) == ["warmturn", "mlx_lm.server"]
    assert select_peers("", vllm_mlx=True) == ["warmturn", "mlx_lm.server", "vllm-mlx-cb"]
    with pytest.raises(SystemExit):
        select_peers("vllm-mlx-cb", vllm_mlx=False)
    with pytest.raises(SystemExit):
        select_peers("llama.cpp", vllm_mlx=True)
