"""The latency report: summary table, plots, CSV, self-contained HTML and Markdown."""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .diff import POISONS, diff_records
from .load import flows_frame, load_records, stderr_progress
from .plots import PLOTS, arm_order, cost_model, labelled_arms

SAMPLE_CAPTURES = Path(__file__).resolve().parent / "sample"
# Markdown; the HTML report renders its `code` spans as <code>, never as literal backticks.
SAMPLE_NOTE = ("Built from the sample capture bundled with warmturn (`analysis/sample/`), recorded from a real "
               "run of the tool: see `analysis/sample/README.md`. Run your own traffic through `make run` "
               "and `make report` uses `captures/` instead.")
CLASS_NOTE = ("Warm = the prefix cache served at least 80% of the prompt (cache read / prompt tokens); anything "
              "less is cold: a turn that read 28% from the cache still prefilled 72% of its prompt. Without "
              "cache usage from the backend, cold = the first request of its prefix. Arms come only from labels "
              "(`--label`, or the capture's `capture_label`); the baseline arm is the first labelled arm. Side "
              "requests (Claude Code's title request) are not turns and are left out of these numbers.")


PROMPT_TITLE = "What changes in the prompt (system, tools, messages: what a prefix cache sees)"
OUTSIDE_TITLE = "Changes outside the prompt (headers, metadata, safeguards, diagnostics): harmless to the KV cache"


def _md_code(text: str) -> str:
    """A Markdown code span that survives backticks inside (a pattern's path class has one)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _html_text(text: str) -> str:
    """Escape for HTML, turning Markdown `code` spans into <code> elements."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


CLASSES = ("cold", "warm", "all")


def summarize(df: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """Per arm and class (cold, warm, all): count, median and p90 TTFT, speed-ups, and the median
    queue wait the backend reported (``queue_ms``: time before its engine started the request).

    Side requests (the title request) are left out. ``speedup_vs_cold`` = the arm's cold median
    / this row's median; ``speedup_vs_baseline`` = the baseline arm's median for the same class /
    this row's median, for labelled arms only (baseline: the first labelled arm): an A/B compares
    arms someone named, never "unlabelled" flows against labelled ones.
    """
    turns = df[df["cls"] != "side"] if "cls" in df else df
    if "queue_ms" not in turns:
        turns = turns.assign(queue_ms=math.nan)
    arms = arm_order(turns)
    both = pd.concat([turns, turns.assign(cls="all")])  # each flow counted in its class and in "all"
    timed = both[both["ttft_ms"].notna()]
    stats = timed.groupby(["arm", "cls"]).agg(
        timed=("ttft_ms", "size"), median_ttft_ms=("ttft_ms", "median"),
        p90_ttft_ms=("ttft_ms", lambda x: x.quantile(0.9)), median_hit_ratio=("hit_ratio", "median"),
        median_queue_ms=("queue_ms", "median"))
    counts = both.groupby(["arm", "cls"]).size().rename("count")
    index = pd.MultiIndex.from_product([arms, CLASSES], names=["arm", "class"])
    s = stats.join(counts, how="outer").rename_axis(["arm", "class"]).reindex(index)
    s[["count", "timed"]] = s[["count", "timed"]].fillna(0).astype(int)
    s = s.reset_index()[["arm", "class", "count", "timed", "median_ttft_ms", "p90_ttft_ms", "median_hit_ratio",
                         "median_queue_ms"]]
    cold = s[s["class"] == "cold"].set_index("arm")["median_ttft_ms"]
    s["speedup_vs_cold"] = s["arm"].map(cold) / s["median_ttft_ms"]
    labelled = labelled_arms(turns)
    base = baseline if baseline in labelled else (labelled[0] if labelled else None)
    s["speedup_vs_baseline"] = math.nan
    if base is not None:
        base_med = s[s["arm"] == base].set_index("class")["median_ttft_ms"]
        rows = s["arm"].isin(labelled)
        s.loc[rows, "speedup_vs_baseline"] = s.loc[rows, "class"].map(base_med) / s.loc[rows, "median_ttft_ms"]
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
                 ("speedup_vs_baseline", "speed-up vs baseline arm", "x"),
                 ("median_queue_ms", "median queue wait", "ms")]


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


def _class_counts(df: pd.DataFrame) -> str:
    """Requests per class, and how many of them have a TTFT (what the plots' legends count)."""
    parts = []
    for cls in ("cold", "warm"):
        d = df[df["cls"] == cls]
        parts.append(f"{cls}: {len(d)} ({int(d['ttft_ms'].notna().sum())} timed)")
    side = int((df["cls"] == "side").sum())
    return "Requests by class: " + ", ".join(parts) + (f"; side requests (title): {side}." if side else ".")


WHATIF_TITLE = "What-if: hit rate against the RAM budget"
WHATIF_PNG = "whatif_budget.png"


def whatif_section(records: Sequence[dict], out: Path) -> tuple[list[str], bool]:
    """The what-if chart (``whatif_budget.png``) and its sentences; (reason it was skipped, False)
    when the served model's tokenizer is not there to render the prompts with."""
    from .budget import report_curves
    from .plots import plot_whatif_budget
    from .whatif import fmt_bytes, load_renderer

    try:
        renderer, model_dir = load_renderer("default")
    except (ImportError, OSError, ValueError) as e:
        return [f"What-if skipped: no tokenizer to render the prompts with ({e})."], False
    res = report_curves(records, renderer, model_dir)
    plot_whatif_budget(res["curves"], res["flattens_at"], out / WHATIF_PNG,
                       f"{res['model']}: {res['bytes_per_token']:,.0f} KV bytes/token")
    lines = [f"The captured requests replayed through a model of the server's prefix cache (`python -m analysis "
             f"whatif`), rendered with the default model's tokenizer; KV cost {res['kv']}."]
    for name, label in (("none", "Without normalization"), ("rules", "With today's rules")):
        curve, at = res["curves"].get(name) or [], res["flattens_at"].get(name)
        if curve and at:
            best = max(h for _, h in curve)
            lines.append(f"{label}: the hit rate reaches {best:.1%} and flattens from a {fmt_bytes(at)} budget.")
    return lines, True


@dataclass
class _Content:
    """What both report.html and report.md say, in the order they say it."""

    sources: list[str]
    facts: list[str]
    heads: list[str]
    rows: list[list[str]]
    images: dict[str, bytes]
    wi_lines: list[str]
    wi_plot: bool
    vol_rows: list[list[str]]
    out_rows: list[list[str]]
    poisons: list[str]
    suggested: list[str]
    unsuggested: list[str]

    VOL_HEADS = ("path", "where", "times changed", "known as")
    OUT_HEADS = ("path", "times changed", "known as")


TITLE = "warmturn latency report"


def _html_list(title: str, items: list[str], code: bool = False) -> str:
    item = "<li><code>{}</code></li>" if code else "<li>{}</li>"
    return f"<h3>{title}</h3><ul>" + "".join(item.format(html.escape(x)) for x in items) + "</ul>"


def _image(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _report_html(c: _Content, sample: bool) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE}</title><style>{_CSS}</style>"
             f"</head><body><h1>{TITLE}</h1>"]
    if sample:
        parts.append(f"<p class='note'>{_html_text(SAMPLE_NOTE)}</p>")
    parts.append("<p>Sources: " + ", ".join(f"<code>{html.escape(Path(p).name)}</code>" for p in c.sources) + "</p>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in c.facts) + "</ul>")
    parts.append("<h2>Summary: TTFT per arm and class</h2>" + _html_table(c.heads, c.rows))
    parts.append(f"<p>{_html_text(CLASS_NOTE)}</p>")
    for name, caption, _ in PLOTS:
        parts.append(f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' "
                     f"src='{_image(c.images[name])}'>")
    if c.wi_lines:
        parts.append(f"<h2>{WHATIF_TITLE}</h2>" + "".join(f"<p>{_html_text(x)}</p>" for x in c.wi_lines))
    if c.wi_plot:
        parts.append(f"<img alt='{WHATIF_TITLE}' src='{_image(c.images[WHATIF_PNG])}'>")
    parts.append(f"<h2>{PROMPT_TITLE}</h2>" + _html_table(c.VOL_HEADS, c.vol_rows))
    if c.out_rows:
        parts.append(f"<h3>{OUTSIDE_TITLE}</h3>" + _html_table(c.OUT_HEADS, c.out_rows))
    if c.poisons:
        parts.append(_html_list("Known cache poisons in the prompt", c.poisons))
    if c.suggested:
        parts.append(_html_list("Suggested normalization", c.suggested, code=True))
    if c.unsuggested:
        parts.append(_html_list("Still different after these patterns", c.unsuggested))
    parts.append("</body></html>")
    return "".join(parts)


def _report_md(c: _Content, sample: bool) -> str:
    md = [f"# {TITLE}", ""]
    if sample:
        md += [f"> {SAMPLE_NOTE}", ""]
    md += [f"- {f}" for f in c.facts] + ["", "## Summary: TTFT per arm and class", "", _md_table(c.heads, c.rows), "",
                                          CLASS_NOTE, ""]
    for name, caption, _ in PLOTS:
        md += [f"### {caption}", "", f"![{caption}]({name})", ""]
    if c.wi_lines:
        md += [f"## {WHATIF_TITLE}", ""] + [f"{x}\n" for x in c.wi_lines]
    if c.wi_plot:
        md += [f"![{WHATIF_TITLE}]({WHATIF_PNG})", ""]
    md += [f"## {PROMPT_TITLE}", "", _md_table(c.VOL_HEADS, c.vol_rows), ""]
    if c.out_rows:
        md += [f"### {OUTSIDE_TITLE}", "", _md_table(c.OUT_HEADS, c.out_rows), ""]
    if c.poisons:
        md += ["### Known cache poisons in the prompt", ""] + [f"- {p}" for p in c.poisons] + [""]
    if c.suggested:
        md += ["### Suggested normalization", ""] + [f"- {_md_code(s)}" for s in c.suggested] + [""]
    if c.unsuggested:
        md += ["### Still different after these patterns", ""] + [f"- {u}" for u in c.unsuggested] + [""]
    return "\n".join(md)


def build_report(captures: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
                 sample: bool = False, baseline: str | None = None, whatif: bool = True) -> dict:
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
    for name, _, fn in PLOTS:
        fn(df, out / name)
        images[name] = (out / name).read_bytes()
    wi_lines, wi_plot = whatif_section(res.records, out) if whatif else ([], False)
    if wi_plot:
        images[WHATIF_PNG] = (out / WHATIF_PNG).read_bytes()
    diff = diff_records(res.records)
    fit = cost_model(df)
    heads, rows = summary_rows(summary)
    facts = [
        f"{len(df)} Messages flows in {df['session'].nunique() if len(df) else 0} sessions, "
        f"{res.stats.records} records read from {len(res.stats.files)} file(s), {res.stats.bad} bad line(s) skipped.",
        _class_counts(df),
    ]
    if fit:
        facts.append(f"Cost model (least squares over all timed flows): TTFT ≈ {fit[0]:,.0f} ms + "
                     f"{fit[1]:.2f} ms × uncached prompt tokens.")
    content = _Content(
        sources=[str(p) for p in captures], facts=facts, heads=heads, rows=rows, images=images,
        wi_lines=wi_lines, wi_plot=wi_plot,
        vol_rows=[[v.path, "messages (growth, expected)" if v.expected else v.region, str(v.count), v.poison or ""]
                  for v in diff.volatile[:25]],
        out_rows=[[v.path, str(v.count), v.poison or ""] for v in diff.outside[:25]],
        poisons=[f"{k} ×{n}: {POISONS.get(k, '')}" for k, n in diff.prompt_poisons().items()],
        suggested=[s.set_arg for s in diff.suggestions], unsuggested=list(diff.unsuggested))
    html_path = out / "report.html"
    html_path.write_text(_report_html(content, sample), encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text(_report_md(content, sample), encoding="utf-8")
    return {"html": str(html_path), "md": str(md_path), "csv": str(csv), "flows_csv": str(flows_csv),
            "plots": [str(out / n) for n, _, _ in PLOTS] + ([str(out / WHATIF_PNG)] if wi_plot else []),
            "records": res.stats.records, "flows": len(df),
            "bad": res.stats.bad, "summary": summary, "seconds": time.monotonic() - t0}
