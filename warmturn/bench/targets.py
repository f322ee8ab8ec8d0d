"""Figures of the concurrent replay and issue 13's targets table. Pure functions over the
replay's rows (bench/replay.py), the per-run info (bench/concurrent.py) and the sequential
arms' summaries (bench/summary.py); no pandas, no network.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from warmturn.bench.scenarios import scale_round
from warmturn.bench.summary import fmt, median, percentile

OURS = "warmturn"
CB_PEER = "vllm-mlx-cb"


def distinct_prefix_tokens(sequences: Iterable[Sequence[int]]) -> int:
    """Tokens a perfect shared prefix cache computes for these prompts: the number of nodes of
    their prefix tree (each distinct prefix once), whatever the order they arrive in."""
    seqs = sorted(tuple(s) for s in sequences)
    total, prev = 0, ()
    for s in seqs:
        lcp = 0
        for a, b in zip(prev, s, strict=False):
            if a != b:
                break
            lcp += 1
        total += len(s) - lcp
        prev = s
    return total


def _ok(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if not r.get("error") and r.get("ttft_ms") is not None]


def _num(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def prefilled(rows: list[dict], info: dict | None) -> tuple[float | None, str]:
    """Prompt tokens the server computed over the replay, and where that number comes from."""
    metric = _num((info or {}).get("prefill_tokens_metric"))
    if metric is not None:
        return metric, "server /metrics prefill_tokens_total"
    if rows and all(_num(r.get("server_prompt_tokens")) is not None for r in rows):
        return sum(_num(r["server_prompt_tokens"]) - (_num(r.get("server_reused_tokens")) or 0) for r in rows), \
            "server request log (prompt - reused)"
    if rows and all(_num(r.get("prompt_tokens")) and _num(r.get("cache_read_input_tokens")) is not None
                    for r in rows):
        return sum(_num(r["prompt_tokens"]) - _num(r["cache_read_input_tokens"]) for r in rows), \
            "response usage (prompt - cache_read)"
    vllm = (info or {}).get("vllm_prefill_tokens")
    if vllm is not None:
        return float(vllm), "vllm-mlx log (prompt tokens processed)"
    return None, "not reported by this server"


def decode_rate(rows: list[dict]) -> float | None:
    """Aggregate decode tokens/s of streams that ran together: tokens after each stream's first
    one, over the window from the earliest first token to the last end."""
    rows = [r for r in _ok(rows) if _num(r.get("output_tokens")) and r.get("end_s") is not None]
    if not rows:
        return None
    window = max(float(r["end_s"]) for r in rows) - min(float(r["first_token_s"]) for r in rows)
    tokens = sum(_num(r["output_tokens"]) - 1 for r in rows)
    return tokens / window if window > 0 else None


def summarize_run(scenario: str, peer: str, rows: list[dict], info: dict | None = None,
                  ideal_prefill: int | None = None) -> dict:
    """One scenario on one peer: TTFT p50/p90, queue wait, makespan, output tokens/s, prefilled."""
    mine = [r for r in rows if r["scenario"] == scenario and r["peer"] == peer]
    ok = _ok(mine)
    ttft = [float(r["ttft_ms"]) / 1000 for r in ok]
    queue = [float(r["queue_ms"]) / 1000 for r in ok if _num(r.get("queue_ms")) is not None]
    ends = [float(r["end_s"]) for r in ok if r.get("end_s") is not None]
    sent = [float(r["sent_s"]) for r in mine]
    makespan = max(ends) - min(sent) if ends and sent else None
    out_tokens = sum(_num(r.get("output_tokens")) or 0 for r in ok)
    pre, source = prefilled(ok, info)
    out = {"scenario": scenario, "peer": peer, "requests": len(mine), "errors": len(mine) - len(ok),
           "ttft_p50_s": statistics.median(ttft) if ttft else None, "ttft_p90_s": percentile(ttft, 90),
           "queue_p50_s": statistics.median(queue) if queue and len(queue) == len(ok) else None,
           "queue_p90_s": percentile(queue, 90) if queue and len(queue) == len(ok) else None,
           "makespan_s": makespan, "output_tokens": int(out_tokens),
           "output_tps": out_tokens / makespan if makespan else None,
           "prefilled_tokens": pre, "prefilled_source": source, "ideal_prefill_tokens": ideal_prefill}
    first = [r for r in ok if r.get("role") == "first-turn"]
    out["first_turn_ttft_s"] = float(first[0]["ttft_ms"]) / 1000 if first else None
    if scenario == "scale":
        out.update(scale_figures(ok))
    return out


def scale_figures(rows: list[dict]) -> dict:
    """The `scale` scenario's decode figures: per round (and repeat), one stream's rate and the
    burst's aggregate rate right after it; the medians over rounds of both and of their ratio (a
    round pairs each burst with its own solo run, so a machine that slows down between rounds
    moves both sides of that round's ratio)."""
    rounds: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        n = scale_round(str(r.get("request", "")))
        if n is not None and r.get("role") in ("solo", "stream"):
            rounds.setdefault((r.get("rep"), n), {"solo": [], "stream": []})[r["role"]].append(r)
    solo, streams, ratios = [], [], []
    for part in rounds.values():
        one, many = decode_rate(part["solo"]), decode_rate(part["stream"])
        solo += [one] if one else []
        streams += [many] if many else []
        ratios += [many / one] if one and many else []
    return {"solo_decode_tps": median(solo), "streams_decode_tps": median(streams), "scaling": median(ratios),
            "scale_rounds": len(ratios), "streams": max((len(p["stream"]) for p in rounds.values()), default=0)}


def summarize_concurrent(rows: list[dict], infos: list[dict], ideal: dict[str, int] | None = None) -> list[dict]:
    """summarize_run for every (scenario, peer) present, in run order (repeats pooled; the
    counters' info is summed over repeats)."""
    seen: list[tuple[str, str]] = []
    for r in rows:
        k = (r["scenario"], r["peer"])
        if k not in seen:
            seen.append(k)
    out = []
    for scenario, peer in seen:
        mine = [i for i in infos if i["scenario"] == scenario and i["peer"] == peer]
        info = None
        if mine:
            vals = [_num(i.get("prefill_tokens_metric")) for i in mine]
            vllm = [i.get("vllm_prefill_tokens") for i in mine]
            info = {"prefill_tokens_metric": sum(vals) if all(v is not None for v in vals) else None,
                    "vllm_prefill_tokens": sum(vllm) if all(v is not None for v in vllm) else None}
        reps = len({r["rep"] for r in rows if r["scenario"] == scenario and r["peer"] == peer}) or 1
        ideal_total = (ideal or {}).get(scenario)
        out.append(summarize_run(scenario, peer, rows, info, None if ideal_total is None else ideal_total * reps))
    return out


def concurrent_table(summaries: list[dict]) -> str:
    head = ["scenario", "peer", "requests", "errors", "TTFT p50 s", "TTFT p90 s", "queue p50 s", "queue p90 s",
            "makespan s", "output tok/s", "prompt tokens prefilled (ideal)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        pre = fmt(s["prefilled_tokens"], 0)
        if s.get("ideal_prefill_tokens") is not None:
            pre += f" ({s['ideal_prefill_tokens']})"
        lines.append("| " + " | ".join([s["scenario"], s["peer"], str(s["requests"]), str(s["errors"]),
                                        fmt(s["ttft_p50_s"]), fmt(s["ttft_p90_s"]), fmt(s["queue_p50_s"]),
                                        fmt(s["queue_p90_s"]), fmt(s["makespan_s"]), fmt(s["output_tps"], 1),
                                        pre]) + " |")
    scale = [s for s in summaries if s["scenario"] == "scale"]
    if scale:
        lines += ["", "| peer | rounds | decode tok/s, 1 stream | decode tok/s, 4 streams | scaling |",
                  "|---|---|---|---|---|"]
        for s in scale:
            lines.append(f"| {s['peer']} | {s.get('scale_rounds', 'n/a')} | {fmt(s['solo_decode_tps'], 1)} | "
                         f"{fmt(s['streams_decode_tps'], 1)} | {fmt(s['scaling'])} |")
        lines.append("(medians over rounds; a round is one stream alone, then the burst; scaling is the median of "
                     "the rounds' ratios)")
    return "\n".join(lines)


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _s(v) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def targets(conc: list[dict], seq: dict[str, dict], metrics_names: Sequence[str] = ()) -> list[dict]:
    """Issue 13's targets, each with the measured value and met / MISSED / n/a.

    `conc`: summarize_concurrent output; `seq`: sequential arm summaries by arm key (arm 3 and
    5-vllm-mlx-cb, with `warm_over_floor` / `warm_over_floor_p90`); `metrics_names`: the metric
    names warmturn's /metrics showed after the replay."""
    by = {(s["scenario"], s["peer"]): s for s in conc}
    # the peers; warmturn's own A/B variants (warmturn-arrival, warmturn-no-solo) are not peers
    peers = sorted({s["peer"] for s in conc if not s["peer"].startswith(OURS)})
    rows: list[dict] = []

    def add(case: str, target: str, value: str, ok: bool | None) -> None:
        rows.append({"case": case, "target": target, "measured": value, "status": _status(ok)})

    def ratio(a, b):
        return a / b if a is not None and b else None

    # (a) first turn beside the title request vs alone
    a_ratio = {p: ratio(by.get(("a", p), {}).get("first_turn_ttft_s"), by.get(("a-alone", p), {}).get("first_turn_ttft_s"))
               for p in [OURS, *peers]}
    ours = a_ratio.get(OURS)
    others = ", ".join(f"{p} {_x(v)}" for p, v in a_ratio.items() if p != OURS)
    add("(a) first turn's TTFT", "<= 1.2x its TTFT alone",
        f"{_x(ours)} ({_s(by.get(('a', OURS), {}).get('first_turn_ttft_s'))} vs "
        f"{_s(by.get(('a-alone', OURS), {}).get('first_turn_ttft_s'))} alone)" + (f"; {others}" if others else ""),
        None if ours is None else ours <= 1.2)

    # (b), (c): TTFT p50, p90, makespan <= both peers'
    for sc in ("b", "c"):
        for field, label in (("ttft_p50_s", "TTFT p50"), ("ttft_p90_s", "TTFT p90"), ("makespan_s", "makespan")):
            mine = by.get((sc, OURS), {}).get(field)
            theirs = {p: by.get((sc, p), {}).get(field) for p in peers}
            value = f"{_s(mine)} vs " + ", ".join(f"{p} {_s(v)}" for p, v in theirs.items()) if peers else fmt(mine)
            known = [v for v in theirs.values() if v is not None]
            ok = None if mine is None or not known else all(mine <= v for v in known)
            if ok and len(known) < 2:
                value += " (only one peer ran)"
            add(f"({sc}) {label}", "<= both peers'", value, ok)

    # decode scaling (issue 20: >= 2.8x, above every peer in the same run), and the aggregate
    # rate itself: a faster single stream lowers the ratio, so the tok/s are compared too
    sc = {p: by.get(("scale", p), {}) for p in [OURS, *peers]}
    mine = sc[OURS].get("scaling")
    add("aggregate decode tok/s, 4 streams", ">= 2.8x one stream",
        f"{_x(mine)} ({fmt(sc[OURS].get('streams_decode_tps'), 1)} vs {fmt(sc[OURS].get('solo_decode_tps'), 1)} tok/s)",
        None if mine is None else mine >= 2.8)
    for field, label, show in (("scaling", "scaling", _x), ("streams_decode_tps", "tok/s", lambda v: fmt(v, 1))):
        ours = sc[OURS].get(field)
        theirs = {p: sc[p].get(field) for p in peers}
        known = [v for v in theirs.values() if v is not None]
        add("aggregate decode tok/s, 4 streams", f"{label} >= every peer's in the same run",
            f"{show(ours)} vs " + ", ".join(f"{p} {show(v)}" for p, v in theirs.items()),
            None if ours is None or not known else all(ours >= v for v in known))

    # (b) prefilled tokens vs the ideal (shared prefixes once)
    b = by.get(("b", OURS), {})
    pre, ideal = b.get("prefilled_tokens"), b.get("ideal_prefill_tokens")
    slack = None if ideal is None else ideal * 0.01 + b.get("requests", 0)  # the last prompt token of each request
    others = ", ".join(f"{p} {fmt(by.get(('b', p), {}).get('prefilled_tokens'), 0)}" for p in peers)
    add("(b) prompt tokens prefilled", "the shared prefix once + each sibling's own suffix (ideal)",
        f"{fmt(pre, 0)} vs ideal {fmt(ideal, 0)}" + (f"; {others}" if others else ""),
        None if pre is None or ideal is None else pre <= ideal + slack)

    # single stream, from the sequential arms
    s3, scb = seq.get("3-rotating-on", {}), seq.get("5-vllm-mlx-cb", {})
    for field, label in (("warm_over_floor", "median"), ("warm_over_floor_p90", "p90")):
        v = s3.get(field)
        add(f"single-stream warm TTFT ({label})", "<= 1.10x the floor", f"{_x(v)}", None if v is None else v <= 1.10)
    for field, label in (("warm_ttft_median_s", "median"), ("warm_ttft_p90_s", "p90")):
        mine, theirs = s3.get(field), scb.get(field)
        add(f"single-stream warm TTFT ({label})", "below vllm-mlx -cb",
            f"{_s(mine)} vs {_s(theirs)}", None if mine is None or theirs is None else mine < theirs)

    # /metrics
    names = list(metrics_names)
    want = {"batch size": ("batch",), "queue wait": ("queue_wait", "queued", "queue_seconds"),
            "dedup counts": ("dedup", "shared_prefill", "joined")}
    found = {k: sorted({n.split("{")[0] for n in names if any(w in n for w in ws)}) for k, ws in want.items()}
    add("/metrics", "shows batch size, queue wait and dedup counts",
        "; ".join(f"{k}: {', '.join(v) if v else 'none'}" for k, v in found.items()) if names else "not scraped",
        None if not names else all(found.values()))
    return rows


def targets_table(rows: list[dict]) -> str:
    lines = ["| case | target | measured | status |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['target']} | {r['measured']} | {r['status']} |" for r in rows]
    return "\n".join(lines)
