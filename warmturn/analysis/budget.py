"""Hit rate against the prefix cache's RAM budget: the what-if curve ``make report`` draws."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .kvsize import KVCost
from .whatif import (
    Prepared,
    Settings,
    Tokenizing,
    Totals,
    default_dtype,
    make_variants,
    messages_in_order,
    prepare_variant,
    replay,
)


def budget_points(prepared: Sequence[Prepared], cost: KVCost, points: int = 12) -> list[int]:
    """RAM budgets from half the smallest request (nothing fits) up to everything kept at once."""
    lens = [len(p.tokens) + len(p.reply) for p in prepared if p.tokens is not None]
    if not lens:
        return []
    lo = max(cost.nbytes(min(lens)) // 2, 1)
    hi = max(cost.nbytes(sum(lens)), lo * 4)
    return [int(b) for b in np.geomspace(lo, hi, points)]


def budget_curve(prepared: Sequence[Prepared], settings: Settings, points: int = 12,
                 budgets: Sequence[int] | None = None) -> list[tuple[int, float]]:
    """``(RAM budget in bytes, hit rate)`` at each budget (default: :func:`budget_points`)."""
    out = []
    for b in budgets if budgets is not None else budget_points(prepared, settings.cost, points):
        s = Settings(settings.cost, int(b), settings.disk_bytes, settings.policy, settings.slots, settings.dedup_min)
        t = Totals()
        for r in replay(prepared, s):
            t.add(r)
        out.append((int(b), t.hit_rate))
    return out


def report_curves(records: Sequence[dict], renderer: Any, model_dir: Path, points: int = 12) -> dict:
    """For ``make report``: hit rate against the RAM budget for ``none`` and ``rules``, on the
    served model's own KV cost and family policy, and where each curve flattens."""
    from .kvsize import model_cost

    cost = model_cost(str(model_dir), default_dtype(model_dir))
    settings = Settings(cost, 0, policy="trimmable" if cost.trimmable else "checkpoints")
    msgs = messages_in_order(records)
    tok = Tokenizing(renderer, cost.context)
    out: dict[str, Any] = {"kv": cost.describe(), "model": cost.name, "bytes_per_token": cost.per_token,
                           "curves": {}, "flattens_at": {}}
    prepared = {v.name: prepare_variant(msgs, v, tok, settings.policy == "checkpoints")
                for v in make_variants(records, suggestions=False, captured=False)}
    budgets = budget_points([p for ps in prepared.values() for p in ps], cost, points)
    for name, ps in prepared.items():
        curve = budget_curve(ps, settings, budgets=budgets)
        out["curves"][name] = curve
        out["flattens_at"][name] = flattens_at(curve)
    return out


def flattens_at(curve: Sequence[tuple[int, float]], within: float = 0.01) -> int | None:
    """The smallest budget whose hit rate is within ``within`` (absolute) of the curve's best."""
    if not curve:
        return None
    best = max(h for _, h in curve)
    return next(b for b, h in curve if h >= best - within)
