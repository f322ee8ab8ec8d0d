"""Turn the bench's per-request rows into per-arm figures, the ratios the issue asks for,
a terminal table and CSV files. Pure functions over lists of dicts (no pandas needed).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path


def _ok(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if not r.get("error") and r.get("ttft_ms") is not None]


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are there (None skipped); None for none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def hit_ratio(rows: Iterable[dict]) -> float | None:
    """Reused prompt tokens / prompt tokens. From the embedded server's own request log when
    every row has it (ground truth, independent of how usage is reported), else from the
    responses' usage (Anthropic's accounting) over the rows that report it."""
    rows = list(rows)
    if rows and all(r.get("server_prompt_tokens") for r in rows):
        return sum(int(r["server_reused_tokens"] or 0) for r in rows) / sum(int(r["server_prompt_tokens"]) for r in rows)
    rows = [r for r in rows if r.get("prompt_tokens")]
    if not rows:
        return None
    cached = sum(int(r.get("cache_read_input_tokens") or 0) for r in rows)
    return cached / sum(int(r["prompt_tokens"]) for r in rows)


def summarize_arm(key: str, title: str, rows: list[dict], floors: dict[tuple[str, int], float] | None = None) -> dict:
    """Per-arm figures: cold TTFT, warm TTFT median/p90, hit ratio over warm requests,
    warm/floor (median and p90 over the requests a floor was measured for), errors. With
    `--repeats`, each request counts once, as its median over the repeats (a single sample moves
    ±10% on this machine, and a p90 over five requests is their slowest)."""
    mine = [r for r in rows if r["arm"] == key]
    ok = _ok(mine)
    cold = [r["ttft_ms"] for r in ok if r["phase"] in ("cold", "restart")]
    warm_rows = [r for r in ok if r["phase"] == "warm"]
    by_request: dict[str, list[dict]] = {}
    for r in warm_rows:
        by_request.setdefault(r["request"], []).append(r)
    warm, vs_floor = [], []
    for reps in by_request.values():
        ttft = statistics.median(r["ttft_ms"] for r in reps)
        warm.append(ttft)
        fl = [f for f in ((floors or {}).get((r["request"], r["rep"])) for r in reps) if f]
        if fl:
            vs_floor.append(ttft / statistics.median(fl))
    by_turn = {(r["agent"], r["turn"]): r["ttft_ms"] for r in ok if r["rep"] == 0}
    t2, t5 = by_turn.get(("main", 2)), by_turn.get(("main", 5))
    return {
        "arm": key, "title": title, "requests": len(mine), "errors": len(mine) - len(ok),
        "cold_ttft_s": statistics.median(cold) / 1000 if cold else None,
        "warm_ttft_median_s": statistics.median(warm) / 1000 if warm else None,
        "warm_ttft_p90_s": percentile(warm, 90) / 1000 if warm else None,
        "hit_ratio": hit_ratio(warm_rows),
        "warm_over_floor": statistics.median(vs_floor) if vs_floor else None,
        "warm_over_floor_p90": percentile(vs_floor, 90),
        "turn5_over_turn2": t5 / t2 if t2 and t5 else None,
    }


def _get(summaries: dict[str, dict], key: str, field: str) -> float | None:
    s = summaries.get(key)
    return None if s is None else s.get(field)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(summaries: dict[str, dict], floor_median_s: float | None) -> list[dict]:
    """The ratios that matter, each with how it is computed and the target it has."""
    w = lambda k: _get(summaries, k, "warm_ttft_median_s")  # noqa: E731
    out = [
        ("(2)/(3) what normalization buys", _ratio(w("2-rotating-off"), w("3-rotating-on")),
         "warm median, normalize off / on", "published 5.4x; higher is better"),
        ("(3)/(1) normalized vs stable", _ratio(w("3-rotating-on"), w("1-stable")), "warm median", "~1.0"),
        ("(4)/(3) no cache vs cache", _ratio(w("4-no-cache"), w("3-rotating-on")), "warm median", ">> 1"),
    ]
    for key in sorted(k for k in summaries if k.startswith("5-")):
        out.append((f"(3)/({key}) warmturn vs peer", _ratio(w("3-rotating-on"), w(key)),
                    "warm median, ours / peer", "<= 1.0 (warmturn faster)"))
    out += [
        ("(6)/(3) restart vs warm", _ratio(_get(summaries, "6-restart", "cold_ttft_s"), w("3-rotating-on")),
         "first turn after restart / warm median", "<= 2.0"),
        ("(3)/(7) proxy overhead", _ratio(w("3-rotating-on"), w("7-direct")), "warm median, via mitmdump / direct",
         "~1.0"),
        ("(1)/(7) proxy overhead, same payload", _ratio(w("1-stable"), w("7-direct")),
         "warm median, via mitmdump / direct", "~1.0"),
        ("(3) cold/warm", _ratio(_get(summaries, "3-rotating-on", "cold_ttft_s"), w("3-rotating-on")), "",
         ">= 10"),
        ("(3) warm/floor", _get(summaries, "3-rotating-on", "warm_over_floor"), "median per request",
         "<= 1.10"),
        ("(3) turn 5 / turn 2", _get(summaries, "3-rotating-on", "turn5_over_turn2"), "warm TTFT", "<= 1.1"),
    ]
    rows = [{"ratio": n, "value": v, "how": h, "target": t} for n, v, h, t in out]
    rows.append({"ratio": "floor (median, s)", "value": floor_median_s,
                 "how": "mlx-lm direct: prefill of the uncached tokens on a built cache + first token", "target": ""})
    return rows


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(summaries: list[dict], ratio_rows: list[dict]) -> str:
    """A plain-text table (also valid Markdown) of the per-arm figures and the ratios."""
    head = ["arm", "requests", "errors", "cold TTFT s", "warm TTFT median s", "warm p90 s", "hit ratio",
            "warm/floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        lines.append("| " + " | ".join([s["arm"], str(s["requests"]), str(s["errors"]), fmt(s["cold_ttft_s"]),
                                        fmt(s["warm_ttft_median_s"]), fmt(s["warm_ttft_p90_s"]),
                                        fmt(s["hit_ratio"]), fmt(s["warm_over_floor"])]) + " |")
    lines += ["", "| ratio | value | computed as | target |", "|---|---|---|---|"]
    for r in ratio_rows:
        lines.append(f"| {r['ratio']} | {fmt(r['value'])} | {r['how']} | {r['target']} |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
