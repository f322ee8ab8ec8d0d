"""The latency report: summary table, plots, CSV, self-contained HTML and Markdown."""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from .diff import POISONS, diff_records
from .load import flows_frame, load_records, stderr_progress
from .plots import PLOTS, cost_model

SAMPLE_CAPTURES = Path(__file__).resolve().parent / "sample"
SAMPLE_NOTE = ("Built from the sample capture bundled with warmturn (analysis/sample/), recorded from a real "
               "run of the tool: see analysis/sample/README.md. Run your own traffic through `make run` "
               "and `make report` uses captures/ instead.")


def summarize(df: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """Per arm and class (cold, warm, all): count, median and p90 TTFT, speed-ups.

    ``speedup_vs_cold`` = the arm's cold median / this row's median; ``speedup_vs_baseline`` =
    the baseline arm's median for the same class / this row's median (baseline: the first arm).
    """
    d = df[df["ttft_ms"].notna()]
    arms = list(dict.fromkeys(df.sort_values("arm_order", kind="stable")["arm"])) if "arm_order" in df \
        else list(dict.fromkeys(df["arm"]))
    base = baseline if baseline in arms else (arms[0] if arms else None)
    rows = []
    for arm in arms:
        da = d[d["arm"] == arm]
        for cls in ("cold", "warm", "all"):
            g = da if cls == "all" else da[da["cls"] == cls]
            n_all = int(((df["arm"] == arm) & ((df["cls"] == cls) if cls != "all" else True)).sum())
            rows.append({"arm": arm, "class": cls, "count": n_all, "timed": len(g),
                         "median_ttft_ms": float(g["ttft_ms"].median()) if len(g) else math.nan,
                         "p90_ttft_ms": float(g["ttft_ms"].quantile(0.9)) if len(g) else math.nan,
                         "median_hit_ratio": float(g["hit_ratio"].median()) if g["hit_ratio"].notna().any() else math.nan})
    s = pd.DataFrame(rows, columns=["arm", "class", "count", "timed", "median_ttft_ms", "p90_ttft_ms",
                                    "median_hit_ratio"])
    cold = s[s["class"] == "cold"].set_index("arm")["median_ttft_ms"]
    s["speedup_vs_cold"] = s["arm"].map(cold) / s["median_ttft_ms"]
    if base is not None:
        base_med = s[s["arm"] == base].set_index("class")["median_ttft_ms"]
        s["speedup_vs_baseline"] = s["class"].map(base_med) / s["median_ttft_ms"]
    else:
        s["speedup_vs_baseline"] = math.nan
    return s


def _fmt(v, kind: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if kind == "ms":
        return f"{v:,.0f} ms"
    if kind == "x":
        return f"×{v:.2f}"
    if kind == "%":
        return f"{v:.0%}"
    return str(v)


_SUMMARY_COLS = [("arm", "arm", ""), ("class", "class", ""), ("count", "requests", ""), ("timed", "timed", ""),
                 ("median_ttft_ms", "median TTFT", "ms"), ("p90_ttft_ms", "p90 TTFT", "ms"),
                 ("median_hit_ratio", "median hit ratio", "%"), ("speedup_vs_cold", "speed-up vs cold", "x"),
                 ("speedup_vs_baseline", "speed-up vs baseline arm", "x")]


def summary_rows(s: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    heads = [h for _, h, _ in _SUMMARY_COLS]
    rows = [[_fmt(r[c], k) for c, _, k in _SUMMARY_COLS] for _, r in s.iterrows()]
    return heads, rows


def _md_table(heads: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
                     + ["| " + " | ".join(r) + " |" for r in esc])


def _html_table(heads: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in heads)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%;border:1px solid #eee}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}code{background:#f3f3f3;padding:0 3px}"""


def build_report(captures: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
                 sample: bool = False, baseline: str | None = None) -> dict:
    """Read captures, write plots, CSVs, report.html and report.md into ``out``; return a summary dict."""
    t0 = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = load_records(captures, labels=labels, progress=stderr_progress)
    df = flows_frame(res.records)
    summary = summarize(df, baseline)
    flows_csv = out / "flows.csv"
    df.to_csv(flows_csv, index=False)
    csv = out / "summary.csv"
    summary.to_csv(csv, index=False)
    images: dict[str, bytes] = {}
    for name, fn in PLOTS:
        fig = fn(df, out / name)
        plt.close(fig)
        images[name] = (out / name).read_bytes()
    diff = diff_records(res.records)
    fit = cost_model(df)
    heads, rows = summary_rows(summary)
    vol_heads = ["path", "where", "times changed", "known as"]
    vol_rows = [[v.path, "messages (growth, expected)" if v.expected else v.region, str(v.count), v.poison or ""]
                for v in diff.volatile[:25]]
    sug = [s.set_arg for s in diff.suggestions]
    facts = [
        f"{len(df)} Messages flows in {df['session'].nunique() if len(df) else 0} sessions, "
        f"{res.stats.records} records read from {len(res.stats.files)} file(s), {res.stats.bad} bad line(s) skipped.",
        f"Cold requests: {int((df['cls'] == 'cold').sum())}, warm: {int((df['cls'] == 'warm').sum())}.",
    ]
    if fit:
        facts.append(f"Cost model (least squares over all timed flows): TTFT ≈ {fit[0]:,.0f} ms + "
                     f"{fit[1]:.2f} ms × uncached prompt tokens.")
    poisons = [f"{k} ×{n}: {POISONS.get(k, '')}" for k, n in sorted(diff.poisons.items(), key=lambda kv: -kv[1])]

    title = "warmturn latency report"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style>"
             f"</head><body><h1>{title}</h1>"]
    if sample:
        parts.append(f"<p class='note'>{html.escape(SAMPLE_NOTE)}</p>")
    parts.append("<p>Sources: " + ", ".join(f"<code>{html.escape(Path(p).name)}</code>" for p in captures) + "</p>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>")
    parts.append("<h2>Summary: TTFT per arm and class</h2>" + _html_table(heads, rows))
    parts.append("<p>Cold = the cache read ≈ nothing (hit ratio &lt; 10%), or, without cache usage from the "
                 "backend, the first request of its prefix. Baseline arm = the first arm.</p>")
    for name, _ in PLOTS:
        data = base64.b64encode(images[name]).decode("ascii")
        parts.append(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>What changes between requests</h2>" + _html_table(vol_heads, vol_rows))
    if poisons:
        parts.append("<h3>Known cache poisons</h3><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in poisons) + "</ul>")
    if sug:
        parts.append("<h3>Suggested normalization</h3><ul>" + "".join(f"<li><code>{html.escape(s)}</code></li>"
                                                                     for s in sug) + "</ul>")
    parts.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("".join(parts), encoding="utf-8")

    md = [f"# {title}", ""]
    if sample:
        md += [f"> {SAMPLE_NOTE}", ""]
    md += [f"- {f}" for f in facts] + ["", "## Summary: TTFT per arm and class", "", _md_table(heads, rows), ""]
    md += [f"![{name}]({name})" for name, _ in PLOTS] + ["", "## What changes between requests", "",
                                                          _md_table(vol_heads, vol_rows), ""]
    if poisons:
        md += ["### Known cache poisons", ""] + [f"- {p}" for p in poisons] + [""]
    if sug:
        md += ["### Suggested normalization", ""] + [f"- `{s}`" for s in sug] + [""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return {"html": str(html_path), "md": str(md_path), "csv": str(csv), "flows_csv": str(flows_csv),
            "plots": [str(out / n) for n, _ in PLOTS], "records": res.stats.records, "flows": len(df),
            "bad": res.stats.bad, "summary": summary, "seconds": time.monotonic() - t0}
