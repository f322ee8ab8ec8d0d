"""warmturn.analysis.load: every accepted input shape, bad lines counted, the flows DataFrame's derived numbers."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import pandas as pd
import pytest

from warmturn.analysis.load import add_derived, flows_frame, load_records, parse_path, restore_original

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "tests" / "fixtures" / "captures"
REAL = ROOT / "tests" / "fixtures" / "claude_code"


def test_constructed_capture_counts_bad_lines_and_keeps_going():
    res = load_records([CAPTURES / "constructed_ab.jsonl"])
    assert len(res.records) == 12
    # one line that is not JSON, one with schema 2; the blank line is not an error
    assert res.stats.bad == 2
    assert any(":7:" in ex for ex in res.stats.bad_examples)
    assert any("schema" in ex for ex in res.stats.bad_examples)
    assert {r["arm"] for r in res.records} == {"normalize-off", "normalize-on"}


def test_original_body_is_restored_from_stripped_entries():
    res = load_records([CAPTURES / "constructed_ab.jsonl"])
    on = [r for r in res.records if r["arm"] == "normalize-on"]
    for r in on:
        assert len(r["body"]["system"]) == 1
        assert r["original"]["system"][0]["text"].startswith("x-anthropic-billing-header:")
        assert r["original"]["system"][1] == r["body"]["system"][0]
        assert r["body"]["system"][0]["text"] == r["original"]["system"][1]["text"]


def test_restore_fragment_and_header_in_reverse_order():
    body = {"system": [{"type": "text", "text": "A C"}]}
    stripped = [
        {"kind": "system_block", "index": 0, "block": {"type": "text", "text": "bill"}, "pattern": "p"},
        {"kind": "fragment", "path": "system[0].text", "offset": 2, "text": "B ", "pattern": "q"},
        {"kind": "header", "name": "X-Stainless-Retry-Count", "value": "1", "pattern": "h"},
    ]
    orig, headers = restore_original(body, {"host": "x"}, stripped)
    assert [b["text"] for b in orig["system"]] == ["bill", "A B C"]
    assert headers == {"host": "x", "x-stainless-retry-count": "1"}
    assert body == {"system": [{"type": "text", "text": "A C"}]}  # input untouched


@pytest.mark.parametrize("path,keys", [("system[2].text", ["system", 2, "text"]), ("system", ["system"]),
                                       ("messages[0].content[1].text", ["messages", 0, "content", 1, "text"])])
def test_parse_path(path, keys):
    assert parse_path(path) == keys


def test_parse_path_rejects_junk():
    with pytest.raises(ValueError):
        parse_path("system[x]")


def test_request_log_shape_real_claude_code_payloads():
    res = load_records([REAL / "subagent_round.jsonl"])
    # 4 lines: HEAD / (no body, skipped without counting as bad) and three Messages requests
    assert res.stats.bad == 0
    assert len(res.records) == 3
    sub = [r for r in res.records if r["is_subagent"]]
    assert len(sub) == 1 and sub[0]["agent_id"] == "aa5f35779dfeafd3e"
    assert {r["session_id"] for r in res.records} == {res.records[0]["headers"]["x-claude-code-session-id"]}


def test_raw_bodies_jsonl_and_json_array(tmp_path):
    bodies = [json.loads(line)["body"] for line in (REAL / "small_two_turns.jsonl").read_text().splitlines()
              if json.loads(line)["body"]]
    jl = tmp_path / "bodies.jsonl"
    jl.write_text("\n".join(json.dumps(b) for b in bodies) + "\n[1, 2]\n")
    arr = tmp_path / "bodies.json"
    arr.write_text(json.dumps(bodies))
    res = load_records([jl, arr])
    assert len(res.records) == 4
    assert res.stats.files[str(jl)] == {"records": 2, "bad": 1}
    assert res.stats.files[str(arr)] == {"records": 2, "bad": 0}
    # no headers here: the session comes from metadata.user_id's session_id
    assert res.records[0]["session_id"] == "9a47cf60-a8ac-440e-bffd-8cda7f17f129"


def test_har(tmp_path):
    lines = [json.loads(x) for x in (REAL / "small_two_turns.jsonl").read_text().splitlines()]
    sse = ('event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":40,'
           '"cache_read_input_tokens":300}}}\n\nevent: message_delta\ndata: {"type":"message_delta",'
           '"delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":5}}\n\n')
    entries = []
    for i, rec in enumerate(lines):
        req = {"method": rec["method"], "url": "http://127.0.0.1:8080" + rec["path"],
               "headers": [{"name": k, "value": v} for k, v in rec["headers"].items()]}
        if rec["body"] is not None:
            req["postData"] = {"mimeType": "application/json", "text": json.dumps(rec["body"])}
        entries.append({"startedDateTime": f"2026-11-22T01:00:0{i}.000Z", "time": 900.0,
                        "timings": {"blocked": -1, "dns": -1, "connect": 0, "send": 1, "wait": 250, "receive": 600},
                        "request": req, "response": {"status": 200, "content": {"text": sse}}})
    entries.append({"request": {"method": "POST", "url": "http://x/v1/messages", "postData": {"text": "{oops"}}})
    har = tmp_path / "s.har"
    har.write_text(json.dumps({"log": {"version": "1.2", "entries": entries}}))
    res = load_records([har])
    assert len(res.records) == 2 and res.stats.bad == 1
    r = res.records[0]
    assert r["kind"] == "messages" and r["ttfb_ms"] == 251.0 and r["total_ms"] == 900.0
    assert r["usage"] == {"input_tokens": 40, "cache_read_input_tokens": 300, "output_tokens": 5}
    assert r["stop_reason"] == "end_turn"
    assert r["t"]["request"] == pd.Timestamp("2026-11-22T01:00:01Z").timestamp()


def test_labels_override_and_must_match_files():
    res = load_records([CAPTURES / "constructed_volatile.jsonl"], labels=["mine"])
    assert {r["arm"] for r in res.records} == {"mine"}
    with pytest.raises(ValueError):
        load_records([CAPTURES / "constructed_volatile.jsonl"] * 3, labels=["a", "b"])


def test_add_derived_from_literal_rows():
    rows = [
        # arm A: a prefix written once, then read
        {"arm": "A", "session": "s", "agent": "main", "t_request": 1.0, "ttft_ms": 3000.0, "prefix_hash": "h",
         "input_tokens": 1000, "cache_read_tokens": 0, "cache_creation_tokens": 1000},
        {"arm": "A", "session": "s", "agent": "main", "t_request": 2.0, "ttft_ms": 300.0, "prefix_hash": "h",
         "input_tokens": 100, "cache_read_tokens": 1900, "cache_creation_tokens": 0},
        {"arm": "A", "session": "s", "agent": "main", "t_request": 3.0, "ttft_ms": 2500.0, "prefix_hash": "h",
         "input_tokens": 2050, "cache_read_tokens": 150, "cache_creation_tokens": 0},  # 150/2200 < 80%: cold
        # arm B: no cache usage reported: first of its prefix hash is cold, the repeat warm
        {"arm": "B", "session": "t", "agent": "main", "t_request": 5.0, "ttft_ms": 900.0, "prefix_hash": "p",
         "input_tokens": 500, "cache_read_tokens": None, "cache_creation_tokens": None},
        {"arm": "B", "session": "t", "agent": "main", "t_request": 4.0, "ttft_ms": 2000.0, "prefix_hash": "p",
         "input_tokens": 500, "cache_read_tokens": None, "cache_creation_tokens": None},
    ]
    df = add_derived(pd.DataFrame(rows, columns=list(rows[0]) + ["prompt_tokens"]))
    a = df[df["arm"] == "A"]
    assert a["prompt_tokens"].tolist() == [2000, 2000, 2200]
    assert a["uncached_tokens"].tolist() == [2000, 100, 2050]
    assert a["hit_ratio"].round(4).tolist() == [0.0, 0.95, round(150 / 2200, 4)]
    assert a["cls"].tolist() == ["cold", "warm", "cold"]
    b = df[df["arm"] == "B"]
    # ordered by request time: the t=4 request is turn 1 and cold
    assert b["t_request"].tolist() == [4.0, 5.0]
    assert b["turn"].tolist() == [1, 2]
    assert b["cls"].tolist() == ["cold", "warm"]
    assert b["hit_ratio"].isna().all()
    assert df["arm"].tolist() == ["A", "A", "A", "B", "B"]


def test_flows_frame_on_constructed_capture():
    df = flows_frame(load_records([CAPTURES / "constructed_ab.jsonl"]).records)
    assert len(df) == 12
    off = df[df["arm"] == "normalize-off"]
    on = df[df["arm"] == "normalize-on"]
    assert (off["cls"] == "cold").all()
    assert on.sort_values(["session", "turn"])["cls"].tolist() == ["cold", "warm", "warm"] * 2
    assert off["turn"].tolist() == [1, 2, 3, 1, 2, 3]
    assert on[on["cls"] == "warm"]["hit_ratio"].round(4).tolist() == [round(2000 / 2050, 4), round(2050 / 2100, 4)] * 2
    assert math.isclose(float(on["ttft_ms"].median()), 420.0)
    assert on["stripped_count"].tolist() == [1] * 6


def test_long_loads_report_progress(monkeypatch):
    import warmturn.analysis.load as load

    monkeypatch.setattr(load, "_PROGRESS_BYTES", 20_000)
    seen = []
    res = load_records([CAPTURES / "constructed_ab.jsonl"], progress=lambda src, done, total: seen.append((done, total)))
    size = (CAPTURES / "constructed_ab.jsonl").stat().st_size
    assert len(res.records) == 12
    assert len(seen) >= size // 20_000 and seen[-1] == (size, size)
    assert all(a[0] < b[0] for a, b in pairwise(seen))
