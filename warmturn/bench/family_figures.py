"""bench --families: the figures of a run (per-family summary, verdicts against mlx_lm.server, the
tables), pure functions over the rows warmturn/bench/families.py collects."""

from __future__ import annotations

from collections.abc import Sequence

TOLERANCE = 0.01  # of a share: warmturn "reads at least as much" when >= mlx_lm's share - this
MLX_REFERENCE = ("mlx_lm-batched", "mlx_lm-solo")


def _turn_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    turns = {int(r["request"][1:]): r for r in rows if r["request"].startswith("t")}
    return [(turns[k - 1], turns[k]) for k in sorted(turns) if k - 1 in turns]



# --- figures --------------------------------------------------------------------------------------


def _ratio(num, den) -> float | None:
    if num is None or den in (None, 0):
        return None
    return float(num) / float(den)


def summarize(rows: list[dict], floors: dict[tuple[int, int], float], cache_info: dict | None = None) -> dict:
    """One family × server: read shares, warm TTFT / floor per turn, errors (see the module doc)."""
    s: dict = {"family": rows[0]["family"], "server": rows[0]["server"],
               "errors": sum(1 for r in rows if r["error"]),
               "cache": (cache_info or {}).get("family", ""),
               "layers": " + ".join(f"{k} {v}" for k, v in ((cache_info or {}).get("layers") or {}).items())}
    ok = [r for r in rows if not r["error"]]
    by = {r["request"]: r for r in ok}
    for prev, cur in _turn_pairs(ok):
        k = cur["request"]
        s[f"{k}_read"] = cur["cached_tokens"]
        s[f"{k}_prev_prompt"] = prev["prompt_tokens"]
        s[f"{k}_share"] = _ratio(cur["cached_tokens"], prev["prompt_tokens"])
        cached = min(int(prev["prompt_tokens"]), int(cur["prompt_tokens"]) - 1)
        floor = floors.get((cached, int(cur["prompt_tokens"]) - cached))
        s[f"{k}_ttft_ms"] = cur["ttft_ms"]
        s[f"{k}_floor_ms"] = floor
        s[f"{k}_ttft_floor"] = _ratio(cur["ttft_ms"], floor)
    if "diverge" in by:
        d = by["diverge"]
        s["diverge_read"], s["diverge_shared"] = d["cached_tokens"], d.get("shared_tokens")
        s["diverge_share"] = _ratio(d["cached_tokens"], d.get("shared_tokens"))
    if "repeat" in by:
        s["repeat_read"], s["repeat_prompt"] = by["repeat"]["cached_tokens"], by["repeat"]["prompt_tokens"]
        s["repeat_share"] = _ratio(by["repeat"]["cached_tokens"], by["repeat"]["prompt_tokens"])
    conc = [r for r in rows if r["request"].startswith("c")]
    if conc and all(not r["error"] for r in conc) and len(conc) > 1:
        shared = conc[0].get("shared_tokens")
        s["concurrent_read"] = sum(int(r["cached_tokens"] or 0) for r in conc)
        s["concurrent_ideal"] = None if shared is None else (len(conc) - 1) * shared
        s["concurrent_share"] = _ratio(s["concurrent_read"], s["concurrent_ideal"])
    return s


def share_keys(summary: dict) -> list[str]:
    turns = sorted((k for k in summary if k.startswith("t") and k.endswith("_share")), key=lambda k: int(k[1:-6]))
    return turns + [k for k in ("diverge_share", "repeat_share", "concurrent_share") if k in summary]


def compare(ours: dict, ref: dict | None, tolerance: float = TOLERANCE) -> tuple[bool | None, list[str]]:
    """Whether ``ours`` reads at least as much as ``ref`` on every share both have (None: nothing
    to compare), and the shares where it does not ("t2 0.04 < 0.99")."""
    if ref is None or ref.get("errors") or ours.get("errors"):
        return None, []
    short, compared = [], 0
    for k in share_keys(ref):
        a, b = ours.get(k), ref.get(k)
        if a is None or b is None:
            continue
        compared += 1
        if a < b - tolerance:
            short.append(f"{k[:-6]} {a:.2f} < {b:.2f}")
    return (not short) if compared else None, short


def add_verdicts(summaries: list[dict]) -> None:
    """For every warmturn summary, ``ge_<mlx server>`` (True/False/None) and ``short_<mlx server>``."""
    by = {(s["family"], s["server"]): s for s in summaries}
    for s in summaries:
        if not s["server"].startswith("warmturn"):
            continue
        for ref in MLX_REFERENCE:
            ok, short = compare(s, by.get((s["family"], ref)))
            s[f"ge_{ref}"] = ok
            s[f"short_{ref}"] = "; ".join(short)


def _share_cell(s: dict, key: str, read: str, of: str) -> str:
    v = s.get(key)
    if v is None:
        return "n/a"
    return f"{v:.2f} ({s.get(read)}/{s.get(of)})"


def _ttft_cell(s: dict, k: str) -> str:
    t, f, r = s.get(f"{k}_ttft_ms"), s.get(f"{k}_floor_ms"), s.get(f"{k}_ttft_floor")
    if t is None:
        return "n/a"
    if f is None or r is None:
        return f"{t:.0f} ms / n/a"
    return f"{t:.0f} / {f:.0f} ms = {r:.1f}×"


def _verdict(s: dict, ref: str) -> str:
    if not s["server"].startswith("warmturn"):
        return "–"
    ok = s.get(f"ge_{ref}")
    if ok is None:
        return "n/a"
    return "yes" if ok else f"**NO**: {s.get(f'short_{ref}')}"


def family_table(summaries: list[dict]) -> str:
    """One table per family: every server's read shares, warm TTFT / floor per turn, verdicts."""
    out = []
    for family in dict.fromkeys(s["family"] for s in summaries):
        group = [s for s in summaries if s["family"] == family]
        info = next((s for s in group if s.get("cache")), group[0])
        turns = [k[:-6] for k in share_keys(group[0]) if k.startswith("t")]
        head = (["server"] + [f"{t} read / prev prompt" for t in turns]
                + ["diverge read / shared", "repeat read / prompt", "concurrent read / (K-1)×shared"]
                + [f"{t} TTFT / floor" for t in turns] + ["≥ mlx_lm batched", "≥ mlx_lm solo", "errors"])
        lines = [f"{family} — cache: {info.get('cache') or '?'} ({info.get('layers') or '?'})", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in group:
            cells = [s["server"]]
            cells += [_share_cell(s, f"{t}_share", f"{t}_read", f"{t}_prev_prompt") for t in turns]
            cells += [_share_cell(s, "diverge_share", "diverge_read", "diverge_shared"),
                      _share_cell(s, "repeat_share", "repeat_read", "repeat_prompt"),
                      _share_cell(s, "concurrent_share", "concurrent_read", "concurrent_ideal")]
            cells += [_ttft_cell(s, t) for t in turns]
            cells += [_verdict(s, "mlx_lm-batched"), _verdict(s, "mlx_lm-solo"), str(s["errors"])]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def overview_table(summaries: list[dict], servers: Sequence[str]) -> str:
    """One line per family: warm share of every turn per server, and warmturn's verdicts."""
    fams = list(dict.fromkeys(s["family"] for s in summaries))
    by = {(s["family"], s["server"]): s for s in summaries}
    refs = [r for r in MLX_REFERENCE if r in servers]
    head = (["family", "cache"] + [f"{k} t2…tN share" for k in servers]
            + [f"warmturn reads ≥ {r.replace('-', ' ')}" for r in refs])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in fams:
        info = next((by[(f, k)] for k in servers if (f, k) in by and by[(f, k)].get("cache")), {})
        cells = [f, info.get("cache", "?")]
        for k in servers:
            s = by.get((f, k))
            shares = [s.get(t) for t in share_keys(s) if t.startswith("t")] if s else []
            cells.append(" / ".join("n/a" if v is None else f"{v:.2f}" for v in shares) or "n/a")
        for r in refs:  # over every warmturn server of the run
            verdicts = [by[(f, k)].get(f"ge_{r}") for k in servers if k.startswith("warmturn") and (f, k) in by]
            cells.append("n/a" if not verdicts or None in verdicts else ("yes" if all(verdicts) else "**NO**"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
