"""Terminal output: aligned tables, ANSI colours only when writing to a TTY."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from .diff import HARMLESS, POISONS, DiffReport

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CODES = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}


class Style:
    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self.enabled = enabled

    def __call__(self, text: str, color: str) -> str:
        return f"\x1b[{_CODES[color]}m{text}\x1b[0m" if self.enabled else text


def _width(s: str) -> int:
    return len(_ANSI.sub("", s))


def table(headers: Sequence[str], rows: Sequence[Sequence], style: Style) -> str:
    """Columns padded to their widest cell (colour codes do not count)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(_width(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        line = "  ".join(c + " " * (w - _width(c)) for c, w in zip(r, widths, strict=True)).rstrip()
        lines.append(style(line, "bold") if n == 0 else line)
    return "\n".join(lines)


def _clip(v, n: int = 48) -> str:
    s = v if isinstance(v, str) else repr(v)
    s = s.replace("\n", "⏎")
    return s if len(s) <= n else s[: n - 1] + "…"


def _pair_row(p, st: Style) -> list:
    """One consecutive-request pair's row of the first table."""
    d = p.divergence
    share = d.shared_chars / d.chars_b if d.chars_b else 1.0
    if p.shared_tokens is not None:  # as the server renders them
        tok = f"{p.shared_tokens:,}/{p.prompt_tokens:,}"
    else:
        tok = f"{d.shared_tokens:,}/{d.tokens_b:,}" if d.shared_tokens is not None else "-"
    read = "-"
    if p.cache_read is not None and p.prompt_tokens:
        read = (f"{p.cache_read:,} ({p.cache_read / p.prompt_tokens:.0%})"
                + ("" if p.cache_read_source == "reported" else " ~"))
    where = d.where
    where = st(where, "red") if d.in_prefix else st(where, "green") if where in ("identical", "end") else where
    return [p.relation, p.session[:12], p.agent[:12], _turns(p),
            f"{d.shared_chars:,}/{d.chars_b:,}", f"{share:.0%}", tok, read, where, len(p.changes)]


def _pairs_section(rep: DiffReport, st: Style) -> list[str]:
    out = [st("Consecutive requests", "bold") + f" ({len(rep.pairs)} pairs, by session and turn)"]
    out.append(table(["relation", "session", "agent", "turns", "shared chars", "share", "shared tokens",
                      "cache read", "diverges at", "changes"], [_pair_row(p, st) for p in rep.pairs], st))
    if any(p.shared_tokens is not None for p in rep.pairs):
        out.append(st("  shared tokens: the two prompts as the server renders them (chat template, tools first); "
                      "cache read: what the later request read from the prefix cache, which holds every earlier "
                      "request (as reported; ~ predicted by whatif)", "dim"))
    elif not any(p.divergence.shared_tokens is not None for p in rep.pairs):
        out.append(st("  (no tokenizer: shared chars compare the raw JSON in system-first order; --tokenizer "
                      "default renders the prompts as the server does)", "dim"))
    for p in rep.pairs:
        if p.divergence.in_prefix:
            out.append(f"  {p.label}: prefix diverges at {p.divergence.where}:")
            out.append("    before: " + st(p.divergence.snippet_a, "dim"))
            out.append("    after:  " + p.divergence.snippet_b)
    if rep.side:
        out.append("  side requests, not turns (left out of the pairs): "
                   + ", ".join(f"{k} ×{n}" for k, n in rep.side.items()))
    return out


def _changes_section(rep: DiffReport, st: Style) -> list[str]:
    """What changes in the prompt, then outside it, the known poisons and what the addon already removed."""
    out = ["", st("What changes in the prompt (system, tools, message content: what a prefix cache sees)", "bold")]
    rows = []
    for v in rep.volatile:
        region = st(v.region, "red") if v.region == "prefix" else v.region
        if v.expected:
            region = st("messages (growth, expected)", "green")
        known = (v.poison + (" (harmless)" if v.poison in HARMLESS else "")) if v.poison else ""
        rows.append([v.path, region, v.count, ",".join(v.relations), known,
                     _clip(v.example_old, 36), _clip(v.example_new, 36)])
    out.append(table(["path", "where", "times", "seen in", "known as", "old", "new"], rows, st)
               if rows else "  nothing")
    if rep.outside:
        out.append("")
        out.append(st("Changes outside the prompt (headers, metadata, safeguards, diagnostics…): "
                      "harmless to the KV cache", "bold"))
        rows = [[v.path, v.count, ",".join(v.relations), v.poison or "", _clip(v.example_old, 36),
                 _clip(v.example_new, 36)] for v in rep.outside]
        out.append(table(["path", "times", "seen in", "known as", "old", "new"], rows, st))
    in_prompt = rep.prompt_poisons()
    if in_prompt:
        out.append("")
        out.append(st("Known cache poisons in the prompt", "bold"))
        for name, n in in_prompt.items():
            out.append(f"  {st(name, 'yellow')} ×{n}: {POISONS.get(name, '')}")
    if rep.stripped:
        out.append("")
        out.append(st("Already removed by the addon", "bold"))
        for k, n in rep.stripped.items():
            out.append(f"  {k} ×{n}")
    return out


def _suggestions_section(rep: DiffReport, st: Style) -> list[str]:
    out = [""]
    if rep.suggestions:
        out.append(st("Suggested normalization (add to the mitmdump command line)", "bold"))
        for s in rep.suggestions:
            out.append(f"  {s.path}{' (' + s.poison + ')' if s.poison else ''}: {_clip(s.example_old, 30)} → "
                       f"{_clip(s.example_new, 30)}")
            out.append("    " + st(s.set_arg, "green"))
        out.append(st("  (repeat --set once per pattern; setting volatile_fragments replaces its default list, "
                      "so also pass --set volatile_fragments='x-anthropic-billing-header:[^\\n]*\\n?')", "dim"))
    else:
        out.append("No volatile system-prompt text needing a new pattern.")
    if rep.canonical_identity:
        out.append("Model name/id changes at " + ", ".join(rep.canonical_identity) + ": the addon canonicalizes them "
                   "by default (--set canonical_model_identity=true)")
    if rep.unsuggested:
        out.append("Still different after these patterns:")
        out.extend(f"  {u}" for u in rep.unsuggested)
    return out


def format_diff(rep: DiffReport, style: Style | None = None) -> str:
    """The human-readable diff report."""
    st = style or Style()
    return "\n".join(_pairs_section(rep, st) + _changes_section(rep, st) + _suggestions_section(rep, st))


def _turns(p) -> str:
    if p.relation == "turn":
        return f"{p.a_turn}→{p.b_turn}"
    if p.relation == "session":
        return f"{p.a_session[:8]}…→1"
    return f"main {p.a_turn}→1"


def _pct(x: float) -> str:
    return f"{x:.1%}"


def format_whatif(out: dict, style: Style | None = None) -> str:
    """The what-if tables: per session and in total for every variant, then the reality check."""
    st = style or Style()
    s = out["settings"]
    rate = s.get("prefill_rate")
    lines = [st("What-if: the captured requests replayed through a prefix-cache model", "bold"),
             f"  {s['requests']} requests in {s['sessions']} sessions; tokenizer {s['tokenizer']}; "
             f"prefix order {s['prefix_order']}",
             f"  KV: {s['kv']}",
             f"  RAM {s['ram']}, disk {s['disk']}, policy {s['policy']}, slots {s['slots'] or 'unlimited'}, "
             f"context {s['context']:,} tokens, rules off: {', '.join(s['rules_off']) or 'none'}",
             "  prefill rate: " + (f"{rate:,.0f} tok/s ({s['prefill_rate_source']})" if rate else
                                   "none (give --prefill-rate TOK/S for predicted seconds)"), ""]
    heads = ["session", "variant", "requests", "prompt tokens", "read", "hit rate", "prefilled", "evictions"]
    if rate:
        heads += ["prefill s", "saved s"]
    rows = []
    sessions = [x["session"] for x in out["variants"][0]["sessions"]] if out["variants"] else []
    for sess in sessions + ["TOTAL"]:
        for v in out["variants"]:
            t = v if sess == "TOTAL" else next((x for x in v["sessions"] if x["session"] == sess), None)
            if t is None:
                continue
            row = [st("TOTAL", "bold") if sess == "TOTAL" else sess[:12], v["name"], t["requests"],
                   f"{t['prompt_tokens']:,}", f"{t['read_tokens']:,}", _pct(t["hit_rate"]),
                   f"{t['prefilled_tokens']:,}", t["evictions"]]
            if rate:
                row += [f"{t['prefill_seconds']:,.1f}", f"{t['seconds_saved']:,.1f}"]
            rows.append(row)
    lines.append(table(heads, rows, st))
    refused = {v["name"]: v["refused"] for v in out["variants"] if v["refused"]}
    if refused:
        lines.append(st("  refused as the server would (invalid, or over the context): "
                        + ", ".join(f"{k} {n}" for k, n in refused.items()) + " requests: counted with 0 tokens",
                        "dim"))
    for v in out["variants"]:
        if v.get("set_arg"):
            lines.append(f"  {v['name']}: {st(v['set_arg'], 'green')}")
    check = out.get("check")
    if check:
        lines += ["", st("Checked against reality: the as-captured prediction vs the cache_read_input_tokens the "
                         "backend reported", "bold")]
        rows = [[c["session"][:12], c["requests"], f"{c['prompt_tokens']:,}", f"{c['reported_read']:,}",
                 f"{c['predicted_read']:,}", f"{c['abs_error']:,}", _pct(c["error"]),
                 c["prompt_mismatches"]] for c in check]
        lines.append(table(["session", "requests", "prompt tokens", "reported read", "predicted read",
                            "|error| tokens", "error / prompt", "prompt length mismatches"], rows, st))
    api = out.get("anthropic")
    if api:
        s = api["summary"]
        lines += ["", st("Anthropic's own cache (passthrough): what a model of it predicts vs what the API reported",
                         "bold"),
                  f"  {s['requests']} requests: read {s['reported_read']:,} of {s['prompt_tokens']:,} prompt tokens "
                  f"(predicted {s['predicted_read']:,}); "
                  + ", ".join(f"{k} {n}" for k, n in sorted(s["verdicts"].items()))]
        t0 = next((r["t"] for r in api["requests"] if r["t"] is not None), None)
        rows = []
        for r in api["requests"]:
            when = f"{r['t'] - t0:,.0f}" if r["t"] is not None and t0 is not None else "-"
            verdict = r["verdict"]
            color = "green" if verdict == "hit" else "red" if verdict.startswith("unexpected") else "yellow"
            rows.append([r["session"][:12], when, f"{r['reported_read']:,}", f"{r['reported_creation']:,}",
                         f"{r['reported_input']:,}", f"{r['predicted_read']:,}", st(verdict, color), _clip(r["why"], 90)])
        lines.append(table(["session", "t (s)", "read", "written", "input", "predicted read", "verdict", "why"],
                           rows, st))
    return "\n".join(lines)
