"""Latency plots from a flows DataFrame (``load.flows_frame``), written as PNG.

Each ``plot_*(df, path)`` writes one PNG and returns the matplotlib ``Figure``, so tests can
look at the series and labels that were drawn. Figures are made with ``matplotlib.figure.Figure``
directly, not through pyplot: no global backend switch, no figure registry to close, and the
caller's own matplotlib set-up is left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLORS = {"cold": "#1f77b4", "warm": "#ff7f0e"}
_ARM_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def _turns(df: pd.DataFrame) -> pd.DataFrame:
    """Conversation turns: side requests (the title request) left out."""
    return df[df["cls"] != "side"] if "cls" in df else df


def _timed(df: pd.DataFrame) -> pd.DataFrame:
    """Turns with a measured TTFT (the only ones a latency plot can draw)."""
    d = _turns(df)
    return d[d["ttft_ms"].notna()]


def _save(fig: Figure, path: str | Path) -> Figure:
    for ax in fig.axes:
        if ax.get_xlabel() == "turn in session":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in these captures", ha="center", va="center", transform=ax.transAxes)


def plot_ttft_per_turn(df: pd.DataFrame, path: str | Path):
    """TTFT (s) against turn index, one grey line per session/agent, points coloured cold/warm."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    d = _timed(df)
    for _, g in d.groupby(["arm", "session", "agent"], dropna=False):
        ax.plot(g["turn"], g["ttft_ms"] / 1000, color="0.8", linewidth=1, zorder=1)
    for cls in ("cold", "warm"):
        g = d[d["cls"] == cls]
        ax.scatter(g["turn"], g["ttft_ms"] / 1000, color=COLORS[cls], label=f"{cls} ({len(g)} timed)", zorder=2, s=28)
    if d.empty:
        _empty(ax, "timed requests")
    ax.set_xlabel("turn in session")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT per turn")
    ax.legend(title="class")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_cold_warm(df: pd.DataFrame, path: str | Path):
    """Box plot of TTFT (s) per arm and class, with the individual requests as points."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    d = _timed(df)
    rank = {a: i for i, a in enumerate(arm_order(d))}
    boxes = sorted(((arm, cls, g["ttft_ms"].to_numpy() / 1000)
                    for (arm, cls), g in d[d["cls"].isin(list(COLORS))].groupby(["arm", "cls"])),
                   key=lambda b: (rank[b[0]], b[1]))  # arms in file order, cold before warm
    groups = [vals for _, _, vals in boxes]
    labels = [f"{arm}\n{cls}" for arm, cls, _ in boxes]
    colors = [COLORS[cls] for _, cls, _ in boxes]
    if groups:
        bp = ax.boxplot(groups, patch_artist=True, widths=0.5, showfliers=False)  # points drawn below
        for patch, c in zip(bp["boxes"], colors, strict=True):
            patch.set_facecolor(c)
            patch.set_alpha(0.35)
        rng = np.random.default_rng(0)
        for i, (vals, c) in enumerate(zip(groups, colors, strict=True), 1):
            ax.scatter(i + rng.uniform(-0.08, 0.08, len(vals)), vals, color=c, s=14, zorder=3)
        ax.set_xticks(range(1, len(labels) + 1), labels)
    else:
        _empty(ax, "timed requests")
    ax.set_ylabel("time to first token (s)")
    ax.set_xlabel("arm / class")
    ax.set_title("Cold vs warm TTFT")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def cost_model(df: pd.DataFrame) -> tuple[float, float] | None:
    """Least-squares ``ttft_ms ≈ a + b · uncached_tokens`` over timed flows (None with < 2 points)."""
    d = _timed(df)
    d = d[d["uncached_tokens"].notna()]
    if len(d) < 2 or d["uncached_tokens"].nunique() < 2:
        return None
    b, a = np.polyfit(d["uncached_tokens"].astype(float), d["ttft_ms"].astype(float), 1)
    return float(a), float(b)


def plot_ttft_vs_uncached(df: pd.DataFrame, path: str | Path):
    """TTFT (s) against uncached prompt tokens, with the fitted cost line."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    d = _timed(df)
    d = d[d["uncached_tokens"].notna()]
    for cls in ("cold", "warm"):
        g = d[d["cls"] == cls]
        ax.scatter(g["uncached_tokens"], g["ttft_ms"] / 1000, color=COLORS[cls], label=f"{cls} ({len(g)} timed)", s=28)
    fit = cost_model(df)
    if fit:
        a, b = fit
        xs = np.linspace(0, float(d["uncached_tokens"].max()), 50)
        ax.plot(xs, (a + b * xs) / 1000, color="0.3", linestyle="--",
                label=f"fit: {a / 1000:.2f} s + {b:.2f} ms/token")
    if d.empty:
        _empty(ax, "requests with usage and timings")
    ax.set_xlabel("uncached prompt tokens (prompt − cache read)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("Cost model: TTFT grows with the uncached tail")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_hit_ratio(df: pd.DataFrame, path: str | Path):
    """Cache hit ratio (cache read / prompt tokens, %) per turn: one line per session, coloured by arm."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    d = _turns(df)
    d = d[d["hit_ratio"].notna()]
    for i, arm in enumerate(arm_order(d)):
        for n, (_, g) in enumerate(d[d["arm"] == arm].groupby(["session", "agent"], dropna=False, sort=False)):
            g = g.sort_values("turn")
            ax.plot(g["turn"], g["hit_ratio"].to_numpy() * 100, marker="o", alpha=0.8,
                    color=_ARM_COLORS[i % len(_ARM_COLORS)], label=str(arm) if n == 0 else "_nolegend_")
    if d.empty:
        _empty(ax, "cache usage reports")
    else:
        ax.legend(title="arm")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("turn in session")
    ax.set_ylabel("cache hit ratio (% of prompt tokens)")
    ax.set_title("Prompt cache hit ratio per turn")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_ab(df: pd.DataFrame, path: str | Path, baseline: str | None = None):
    """Median TTFT per labelled arm (bars, p10–p90 whiskers) with the speed-up over ``baseline``.

    Arms come only from labels: unlabelled flows are drawn (as one bar) only when no flow has a
    label. Each session's first turn is cold in every arm, so it is left out where an arm has
    later turns: the bars compare the turns a cache can help (an arm with first turns only, e.g.
    a restart, keeps them)."""
    d = _timed(df)
    labelled = labelled_arms(d)
    if labelled:
        d = d[d["arm"].isin(labelled)]
    if len(arm_order(d)) == 1 and "cls" in d:
        return _plot_one_arm(d, path)
    if "turn" in d:
        later = d[d["turn"] > 1]
        d = pd.concat([later, d[~d["arm"].isin(later["arm"])]])
    arms = arm_order(d)
    fig = Figure(figsize=(max(8, 1.1 * len(arms)), 4.5))
    ax = fig.subplots()
    if arms:
        base = baseline if baseline in arms else arms[0]
        q = d.groupby("arm")["ttft_ms"].agg(
            median="median", lo=lambda x: x.quantile(0.1), hi=lambda x: x.quantile(0.9)).reindex(arms) / 1000
        med = q["median"].to_numpy()
        err = np.vstack([med - q["lo"].to_numpy(), q["hi"].to_numpy() - med])
        bars = ax.bar(range(len(arms)), med, yerr=err, capsize=6,
                      color=[_ARM_COLORS[i % len(_ARM_COLORS)] for i in range(len(arms))], label="median TTFT")
        base_med = q.loc[base, "median"]
        for bar, m, a in zip(bars, med, arms, strict=True):
            text = "baseline" if a == base else (f"×{base_med / m:.1f}" if m > 0 else "")
            ax.text(bar.get_x() + bar.get_width() / 2, m / 2 if m > 0 else 0, text, ha="center", va="center",
                    fontsize=12, fontweight="bold", color="white" if m > 0 else "black")
        ax.set_xticks(range(len(arms)), [str(a) for a in arms],
                      rotation=20 if len(arms) > 4 else 0, ha="right" if len(arms) > 4 else "center")
    else:
        _empty(ax, "timed requests")
    ax.set_xlabel("arm")
    ax.set_ylabel("median TTFT after turn 1 (s), whiskers p10–p90")
    ax.set_title("A/B: median time to first token per arm (speed-up vs baseline on the bars)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _plot_one_arm(d: pd.DataFrame, path: str | Path):
    """One arm, nothing to compare it with: its cold and warm median TTFT side by side (labelled
    bars, p10–p90 whiskers, the warm speed-up written on the warm bar) and how to record an A/B."""
    arm = arm_order(d)[0]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    classes = [c for c in ("cold", "warm") if (d["cls"] == c).any()]
    q = d.groupby("cls")["ttft_ms"].agg(median="median", lo=lambda x: x.quantile(0.1),
                                        hi=lambda x: x.quantile(0.9), n="size").reindex(classes)
    med = q["median"].to_numpy() / 1000
    err = np.vstack([med - q["lo"].to_numpy() / 1000, q["hi"].to_numpy() / 1000 - med])
    bars = ax.bar(range(len(classes)), med, yerr=err, capsize=6, color=[COLORS[c] for c in classes])
    for bar, m, c in zip(bars, med, classes, strict=True):
        text = f"×{med[0] / m:.1f}" if c == "warm" and classes[0] == "cold" and m > 0 else ""
        ax.text(bar.get_x() + bar.get_width() / 2, m / 2, text, ha="center", va="center", fontsize=12,
                fontweight="bold", color="white")
    ax.set_xticks(range(len(classes)), [f"{c} turns\n({int(q.loc[c, 'n'])} timed)" for c in classes])
    ax.set_xlabel(f"arm {arm}: the only one in these captures")
    ax.set_ylabel("median TTFT (s), whiskers p10–p90")
    ax.set_title("No A/B: one arm. Cold vs warm median TTFT (speed-up on the warm bar)\n"
                 "Record a second arm with --set capture_label=NAME to compare", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def arm_order(df: pd.DataFrame) -> list:
    """The arms in the order they first appear (file order)."""
    if "arm" not in df or df.empty:
        return []
    d = df.sort_values("arm_order", kind="stable") if "arm_order" in df else df
    return list(dict.fromkeys(d["arm"].tolist()))


def labelled_arms(df: pd.DataFrame) -> list:
    """The arms that come from a label (``--label`` or the capture's ``capture_label``), in order."""
    if "labelled" not in df:
        return arm_order(df)
    return arm_order(df[df["labelled"].astype(bool)])


PLOTS: Sequence[tuple[str, str, Callable[..., Figure]]] = (
    ("ttft_per_turn.png", "Time to first token per turn", plot_ttft_per_turn),
    ("ttft_cold_warm.png", "Cold vs warm time to first token", plot_cold_warm),
    ("ttft_vs_uncached.png", "Time to first token against the uncached prompt (cost model)", plot_ttft_vs_uncached),
    ("hit_ratio.png", "Prompt cache hit ratio per turn", plot_hit_ratio),
    ("ab_median_ttft.png", "A/B: median time to first token per labelled arm", plot_ab),
)


def plot_whatif_budget(curves: dict[str, Sequence[tuple[int, float]]], flat: dict[str, int | None],
                       path: str | Path, kv: str = ""):
    """What-if: cache hit rate (%) against the prefix cache's RAM budget, one line per
    normalization variant, a dotted line where each curve flattens (within 1 point of its best)."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    drawn = False
    for i, (name, curve) in enumerate(curves.items()):
        if not curve:
            continue
        color = _ARM_COLORS[i % len(_ARM_COLORS)]
        xs = [b / 2**20 for b, _ in curve]
        label = {"none": "without normalization", "rules": "with today's rules"}.get(name, name)
        ax.plot(xs, [h * 100 for _, h in curve], marker="o", color=color, label=label)
        at = flat.get(name)
        if at:
            ax.axvline(at / 2**20, color=color, linestyle=":", label=f"{label}: flat from {at / 2**20:,.0f} MiB")
        drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    else:
        _empty(ax, "requests to replay")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("prefix cache RAM budget (MiB, log scale)")
    ax.set_ylabel("predicted hit rate (% of prompt tokens read)")
    ax.set_title("What-if: hit rate against the RAM budget" + (f"\n{kv}" if kv else ""), fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)
