"""warmturn.analysis.plots / analysis.report: numbers, figure contents, files, self-contained HTML, make report."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from warmturn.analysis.load import add_derived, load_records
from warmturn.analysis.plots import cost_model, plot_ab, plot_cold_warm, plot_hit_ratio, plot_ttft_per_turn, plot_ttft_vs_uncached
from warmturn.analysis.report import build_report, summarize, summary_rows

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "tests" / "fixtures" / "captures"
PNG = b"\x89PNG\r\n\x1a\n"


def _rows():
    rows = []
    t = 0.0
    # arm "off": every request cold, TTFT 2000, 2100, 2200 (uncached 1000 tokens each)
    for i, ttft in enumerate((2000.0, 2100.0, 2200.0)):
        t += 1
        rows.append({"arm": "off", "session": "a", "agent": "main", "t_request": t, "ttft_ms": ttft,
                     "prefix_hash": f"h{i}", "input_tokens": 1000, "cache_read_tokens": 0, "cache_creation_tokens": 0})
    # arm "on": cold 2000 then warm 200, 300, 400 (uncached 1000 / 100 tokens)
    for i, ttft in enumerate((2000.0, 200.0, 300.0, 400.0)):
        t += 1
        warm = i > 0
        rows.append({"arm": "on", "session": "b", "agent": "main", "t_request": t, "ttft_ms": ttft, "prefix_hash": "h",
                     "input_tokens": 100 if warm else 1000, "cache_read_tokens": 900 if warm else 0,
                     "cache_creation_tokens": 0})
    return add_derived(pd.DataFrame(rows).assign(prompt_tokens=float("nan")))


@pytest.fixture
def df():
    return _rows()


def test_summary_numbers(df):
    s = summarize(df).set_index(["arm", "class"])
    assert s.loc[("off", "cold"), "count"] == 3 and s.loc[("off", "warm"), "count"] == 0
    assert s.loc[("off", "cold"), "median_ttft_ms"] == 2100.0
    assert math.isclose(s.loc[("off", "cold"), "p90_ttft_ms"], 2180.0)
    assert s.loc[("on", "warm"), "median_ttft_ms"] == 300.0
    assert math.isclose(s.loc[("on", "warm"), "p90_ttft_ms"], 380.0)
    assert math.isclose(s.loc[("on", "warm"), "speedup_vs_cold"], 2000.0 / 300.0)
    # baseline = first arm: "all" medians 2100 vs 350
    assert s.loc[("on", "all"), "median_ttft_ms"] == 350.0
    assert math.isclose(s.loc[("on", "all"), "speedup_vs_baseline"], 6.0)
    assert math.isclose(s.loc[("on", "warm"), "median_hit_ratio"], 0.9)


def test_cost_model_fits_the_small_tail_line(df):
    a, b = cost_model(df)
    # points: (1000, 2000/2100/2200/2000) and (100, 200/300/400): slope 2,000/900 ms per token
    assert math.isclose(b, (2075 - 300) / 900, rel_tol=1e-9)
    assert math.isclose(a, 300 - 100 * b, rel_tol=1e-9)


def _legend(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


def test_plot_ttft_per_turn(df, tmp_path):
    fig = plot_ttft_per_turn(df, tmp_path / "p.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "turn in session" and ax.get_ylabel() == "time to first token (s)"
    assert _legend(ax) == ["cold (4 timed)", "warm (3 timed)"]
    warm = next(c for c in ax.collections if c.get_label() == "warm (3 timed)")
    assert sorted(warm.get_offsets()[:, 1].tolist()) == [0.2, 0.3, 0.4]
    assert sorted(warm.get_offsets()[:, 0].tolist()) == [2, 3, 4]
    assert len(ax.lines) == 2  # one line per session
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG


def test_plot_cold_warm(df, tmp_path):
    fig = plot_cold_warm(df, tmp_path / "p.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["off\ncold", "on\ncold", "on\nwarm"]
    assert ax.get_ylabel() == "time to first token (s)"
    # box medians (the median line of each box) in seconds
    medians = [line.get_ydata()[0] for line in ax.lines if len(line.get_xdata()) == 2
               and line.get_ydata()[0] == line.get_ydata()[1]]
    assert {2.1, 2.0, 0.3} <= {round(m, 3) for m in medians}


def test_plot_ttft_vs_uncached(df, tmp_path):
    fig = plot_ttft_vs_uncached(df, tmp_path / "p.png")
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("uncached prompt tokens")
    labels = _legend(ax)
    assert labels[:2] == ["cold (4 timed)", "warm (3 timed)"] and labels[2].startswith("fit: ")
    fit_line = ax.lines[0]
    a, _b = cost_model(df)
    assert math.isclose(fit_line.get_ydata()[0], a / 1000)


def test_plot_hit_ratio(df, tmp_path):
    fig = plot_hit_ratio(df, tmp_path / "p.png")
    ax = fig.axes[0]
    assert _legend(ax) == ["off", "on"]
    on = next(ln for ln in ax.lines if ln.get_label() == "on")
    assert on.get_xdata().tolist() == [1, 2, 3, 4]
    assert [round(y, 6) for y in on.get_ydata()] == [0.0, 90.0, 90.0, 90.0]
    assert ax.get_ylabel() == "cache hit ratio (% of prompt tokens)"


def test_plot_ab_writes_the_speedup_on_the_bars(df, tmp_path):
    fig = plot_ab(df, tmp_path / "p.png")
    ax = fig.axes[0]
    # turns after the first: off 2100/2200 ms -> 2.15 s, on 200/300/400 ms -> 0.3 s
    heights = [round(p.get_height(), 6) for p in ax.patches]
    assert heights == [2.15, 0.3]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["baseline", "×7.2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["off", "on"]


def test_plot_ab_leaves_out_each_sessions_cold_first_turn(tmp_path):
    rows = pd.DataFrame({"arm": ["a"] * 3 + ["b"] * 3, "turn": [1, 2, 3] * 2,
                         "ttft_ms": [9000.0, 100.0, 300.0, 8000.0, 400.0, 400.0]})
    fig = plot_ab(rows, tmp_path / "p.png")
    assert [round(p.get_height(), 6) for p in fig.axes[0].patches] == [0.2, 0.4]
    assert [t.get_text() for t in fig.axes[0].texts] == ["baseline", "×0.5"]


def test_plots_handle_captures_without_timings(tmp_path):
    empty = add_derived(pd.DataFrame({"arm": ["x"], "session": ["s"], "agent": ["main"], "t_request": [1.0],
                                      "ttft_ms": [float("nan")], "prefix_hash": [None], "input_tokens": [None],
                                      "cache_read_tokens": [None], "cache_creation_tokens": [None],
                                      "prompt_tokens": [None]}))
    for fn in (plot_ttft_per_turn, plot_cold_warm, plot_ttft_vs_uncached, plot_hit_ratio, plot_ab):
        fig = fn(empty, tmp_path / "e.png")
        assert any(t.get_text().startswith("no ") for t in fig.axes[0].texts)
        assert (tmp_path / "e.png").stat().st_size > 1000


def test_build_report_on_constructed_capture(tmp_path):
    out = tmp_path / "rep"
    info = build_report([CAPTURES / "constructed_ab.jsonl"], out)
    assert info["flows"] == 12 and info["bad"] == 2
    for p in info["plots"]:
        data = Path(p).read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    html = (out / "report.html").read_text()
    # self-contained: no external references of any kind, every image inline
    assert not re.search(r"(?:src|href)\s*=\s*['\"](?!data:)", html)
    assert "http://" not in html and "https://" not in html and "<link" not in html and "<script" not in html
    assert html.count("src='data:image/png;base64,") == 6  # the five plots and the what-if chart
    # the summary numbers computed from the data: off cold median 3020 ms, on warm median 410 ms
    s = summarize(pd.read_csv(out / "flows.csv")).set_index(["arm", "class"])
    assert s.loc[("normalize-off", "cold"), "median_ttft_ms"] == 3020.0
    assert s.loc[("normalize-on", "warm"), "median_ttft_ms"] == 410.0
    for text in ("3,020 ms", "410 ms", "×7.19", "2 bad line(s) skipped", "billing_block"):
        assert text in html
    csv = pd.read_csv(out / "summary.csv")
    assert len(csv) == 6 and set(csv["class"]) == {"cold", "warm", "all"}
    md = (out / "report.md").read_text()
    assert "| normalize-on | warm | 4 | 4 | 410 ms |" in md
    # readable section titles (not file names), and no Markdown backticks leaking into the HTML
    assert "### A/B: median time to first token per labelled arm" in md and "](ab_median_ttft.png)" in md
    assert "<h3>Time to first token per turn</h3>" in html and "<h3>ttft_per_turn.png" not in html
    assert "`" not in re.sub(r"<img[^>]*>", "", html)
    # prompt changes apart from the harmless ones outside the prompt (headers, metadata)
    assert "<h2>What changes in the prompt" in html and "harmless to the KV cache</h3>" in html
    assert "| metadata.user_id |" not in md.split("### Changes outside the prompt")[0]
    # the header's per-class counts are what the legends count
    assert "Requests by class: cold: 8 (8 timed), warm: 4 (4 timed)." in html


def _flows(rows: list[tuple]) -> pd.DataFrame:
    cols = ["arm", "labelled", "session", "agent", "side", "t_request", "ttft_ms", "input_tokens",
            "cache_read_tokens", "cache_creation_tokens", "prompt_tokens", "prefix_hash"]
    return add_derived(pd.DataFrame([dict(zip(cols, r, strict=True)) for r in rows], columns=cols))


def test_a_turn_with_28_percent_cached_is_cold():
    df = _flows([("a", True, "s", "main", None, 1.0, 20000.0, 1000, 0, 0, None, "h"),
                 ("a", True, "s", "main", None, 2.0, 27000.0, 720, 280, 0, None, "h"),  # 28% read
                 ("a", True, "s", "main", None, 3.0, 490.0, 10, 990, 0, None, "h")])  # 99% read
    assert df["cls"].tolist() == ["cold", "cold", "warm"]
    assert df["hit_ratio"].round(2).tolist() == [0.0, 0.28, 0.99]


def test_ab_arms_come_only_from_labels(tmp_path):
    # one capture file: a labelled run and unlabelled flows from another run
    df = _flows([("on", True, "s1", "main", None, 1.0, 9000.0, 900, 0, 900, None, "h"),
                 ("on", True, "s1", "main", None, 2.0, 300.0, 10, 900, 10, None, "h"),
                 ("unlabelled", False, "s2", "main", None, 3.0, 2500.0, 900, 0, 900, None, "h2"),
                 ("unlabelled", False, "s2", "main", None, 4.0, 2400.0, 900, 0, 900, None, "h2")])
    s = summarize(df).set_index(["arm", "class"])
    assert s.loc[("on", "all"), "speedup_vs_baseline"] == 1.0
    assert s["speedup_vs_baseline"].xs("unlabelled").isna().all()  # no A/B against unlabelled flows
    fig = plot_ab(df, tmp_path / "ab.png")  # one labelled arm: nothing to compare it with
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["cold turns\n(1 timed)", "warm turns\n(1 timed)"]
    assert fig.axes[0].get_xlabel() == "arm on: the only one in these captures"
    # without any label, the flows are one arm, never one arm per file
    real = ROOT / "tests" / "fixtures" / "claude_code"
    res = load_records([real / "small_two_turns.jsonl", real / "tool_round.jsonl"])
    assert {r["arm"] for r in res.records} == {"unlabelled"}


def test_summary_reports_the_backends_queue_wait():
    df = _flows([("a", True, "s", "main", None, 1.0, 9000.0, 900, 0, 0, None, "h"),
                 ("a", True, "s", "main", None, 2.0, 300.0, 10, 900, 0, None, "h"),
                 ("a", True, "s", "main", None, 3.0, 400.0, 10, 910, 0, None, "h")])
    df["queue_ms"] = [0.5, 2500.0, 1.5]
    s = summarize(df).set_index(["arm", "class"])
    assert s.loc[("a", "warm"), "median_queue_ms"] == 1250.75 and s.loc[("a", "all"), "median_queue_ms"] == 1.5
    heads, rows = summary_rows(s.reset_index())
    assert heads[-1] == "median queue wait" and rows[1][-1] == "1,251 ms"


def test_side_requests_are_outside_turn_numbering():
    df = _flows([("a", True, "s", "main", None, 1.0, 9000.0, 900, 0, 900, None, "h"),
                 ("a", True, "s", "main", "title", 1.1, 800.0, 60, 0, 60, None, "t"),
                 ("a", True, "s", "main", None, 2.0, 300.0, 10, 900, 10, None, "h")])
    main = df[df["side"].isna()]
    assert main["turn"].tolist() == [1, 2] and main["cls"].tolist() == ["cold", "warm"]
    side = df[df["side"].notna()]
    assert side["cls"].tolist() == ["side"] and side["turn"].isna().all()
    s = summarize(df).set_index(["arm", "class"])
    assert s.loc[("a", "all"), "count"] == 2


def test_report_cli_with_labels(tmp_path, capsys):
    from warmturn.analysis.__main__ import main

    assert main(["report", str(CAPTURES / "constructed_volatile.jsonl"), str(CAPTURES / "constructed_ab.jsonl"),
                 "--out", str(tmp_path / "r"), "--label", "first", "--label", "second"]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and "15 Messages flows" in out
    csv = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert list(dict.fromkeys(csv["arm"])) == ["first", "second"]


def test_make_report_script_uses_captures_dir(tmp_path):
    (tmp_path / "captures").mkdir()
    shutil.copy(CAPTURES / "constructed_ab.jsonl", tmp_path / "captures" / "warmturn-20261122.jsonl")
    env = {**os.environ, "PY": str(ROOT / ".venv" / "bin" / "python")}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "report.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000
    assert "report.html" in p.stdout and "bundled sample" not in p.stdout


def test_building_a_report_leaves_matplotlib_global_state_alone(tmp_path):
    # a caller that chose its own backend keeps it (no matplotlib.use() at import or while plotting)
    code = ("import matplotlib; matplotlib.use('svg'); "
            "from warmturn.analysis.report import build_report; "
            f"build_report([{str(CAPTURES / 'constructed_ab.jsonl')!r}], {str(tmp_path)!r}); "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]


def test_plot_ab_with_one_arm_draws_its_cold_and_warm_turns_labelled(tmp_path):
    """Issue 21: the A/B chart of a capture with one arm was a single unlabelled bar."""
    df = _flows([("unlabelled", False, "s", "main", None, 1.0, 9000.0, 900, 0, 900, None, "h"),
                 ("unlabelled", False, "s", "main", None, 2.0, 300.0, 10, 900, 10, None, "h"),
                 ("unlabelled", False, "s", "main", None, 3.0, 500.0, 10, 910, 10, None, "h")])
    ax = plot_ab(df, tmp_path / "ab.png").axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [9.0, 0.4]  # cold 9 s, warm median 0.4 s
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cold turns\n(1 timed)", "warm turns\n(2 timed)"]
    assert [t.get_text() for t in ax.texts] == ["", "×22.5"]
    assert "capture_label" in ax.get_title()


def test_report_whatif_section_on_the_sample(tmp_path):
    info = build_report([ROOT / "warmturn" / "analysis" / "sample" / "sample-capture.jsonl"], tmp_path, sample=True)
    assert str(tmp_path / "whatif_budget.png") in info["plots"]
    md = (tmp_path / "report.md").read_text()
    # the sample's billing block rotates cch= on every request: only the rules make it hit
    assert "Without normalization: the hit rate reaches 3.7% and flattens from a 48.7 MiB budget." in md
    assert "With today's rules: the hit rate reaches 82.3% and flattens from a 48.7 MiB budget." in md
    assert "![What-if: hit rate against the RAM budget](whatif_budget.png)" in md
