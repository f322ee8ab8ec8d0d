"""The bundled sample: a capture recorded from a real run of the addon (analysis/sample/README.md)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from warmturn.analysis.diff import diff_records
from warmturn.analysis.divergence import load_tokenizer
from warmturn.analysis.load import flows_frame, load_records
from warmturn.analysis.report import build_report

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "warmturn" / "analysis" / "sample" / "sample-capture.jsonl"


@pytest.fixture(scope="module")
def raw():
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def test_sample_is_small_and_loads_without_bad_lines(raw):
    assert SAMPLE.stat().st_size < 1_000_000
    res = load_records([SAMPLE])
    assert res.stats.bad == 0 and len(res.records) == len(raw) == 12
    assert [r["arm"] for r in res.records] == ["normalize-off"] * 6 + ["normalize-on"] * 6
    # the addon restores to the original: the forwarded on-arm bodies lack the billing block, originals have it
    on = [r for r in res.records if r["arm"] == "normalize-on"]
    assert all(not r["body"]["system"][0]["text"].startswith("x-anthropic-billing-header") for r in on)
    assert all(r["original"]["system"][0]["text"].startswith("x-anthropic-billing-header") for r in on)
    assert all("x-stainless-retry-count" in r["original_headers"] for r in on)


def test_sample_diff_names_the_billing_block_and_counts_tokens(raw):
    tok = load_tokenizer(None)
    rep = diff_records(load_records([SAMPLE]).records, tokenizer=tok)
    off = [p for p in rep.pairs if p.arm == "normalize-off" and p.relation == "turn"]
    on = [p for p in rep.pairs if p.arm == "normalize-on" and p.relation == "turn"]
    assert len(off) == len(on) == 4
    for p in off:
        assert p.divergence.where == "system[0]"
        assert [c.poison for c in p.changes if c.path == "system[0].text"] == ["billing_block"]
        # the cch= value differs: the shared text stops right after "cch="
        assert p.divergence.snippet_a.split("⟦")[0].endswith("cch=")
    for p in on:
        assert p.divergence.where.startswith("messages") and not p.divergence.in_prefix
        assert p.divergence.shared_tokens > 700
    # the server agrees: what it read from its cache on warm turns is within a few tokens of our count
    by_id = {r["id"]: r for r in raw}
    for p in on:
        read = by_id[p.b_id]["usage"]["cache_read_input_tokens"]
        assert abs(read - p.divergence.shared_tokens) <= 25, (read, p.divergence.shared_tokens)
    assert rep.stripped == {"system_block: ^x-anthropic-billing-header:": 6,
                            "header: x-stainless-retry-count": 6}


def test_sample_report_numbers_match_the_raw_capture(raw, tmp_path):
    info = build_report([SAMPLE], tmp_path, sample=True)
    s = info["summary"].set_index(["arm", "class"])
    df = flows_frame(load_records([SAMPLE]).records)
    for arm in ("normalize-off", "normalize-on"):
        ttfts = [r["ttft_ms"] for r in raw if r["label"] == arm]
        assert s.loc[(arm, "all"), "median_ttft_ms"] == pytest.approx(statistics.median(ttfts))
        warm_ids = set(df[(df["arm"] == arm) & (df["cls"] == "warm")]["id"])
        warm = [r["ttft_ms"] for r in raw if r["label"] == arm and r["id"] in warm_ids]
        assert s.loc[(arm, "warm"), "count"] == len(warm)
        if warm:
            assert s.loc[(arm, "warm"), "median_ttft_ms"] == pytest.approx(statistics.median(warm))
    # warm = the cache read at least 80% of the prompt, by the capture's own usage numbers
    for r in raw:
        u = r["usage"]
        ratio = u["cache_read_input_tokens"] / (u["input_tokens"] + u["cache_read_input_tokens"]
                                                + u["cache_creation_input_tokens"])
        cls = df.set_index("id").loc[r["id"], "cls"]
        assert cls == ("warm" if ratio >= 0.8 else "cold")
    html = (tmp_path / "report.html").read_text()
    assert "recorded from a real run" in html
    assert f"{s.loc[('normalize-on', 'warm'), 'median_ttft_ms']:,.0f} ms" in html


def test_make_report_falls_back_to_the_sample(tmp_path):
    env = {**os.environ, "PY": str(ROOT / ".venv" / "bin" / "python")}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "report.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "bundled sample" in p.stdout
    html = (tmp_path / "report" / "report.html").read_text()
    assert "recorded from a real run" in html
    csv = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert set(csv["arm"]) == {"normalize-off", "normalize-on"}


def test_report_without_captures_uses_the_bundled_sample(tmp_path, capsys):
    from warmturn.analysis.__main__ import main

    assert main(["report", "--out", str(tmp_path)]) == 0
    assert "12 records, 12 Messages flows" in capsys.readouterr().out
    assert "recorded from a real run" in (tmp_path / "report.html").read_text()
