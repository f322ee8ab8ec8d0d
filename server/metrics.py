"""Prometheus text exposition of the server's counters (no client library needed)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

_HELP = {
    "requests_total": ("counter", "HTTP requests by endpoint and status"),
    "prefill_tokens_total": ("counter", "prompt tokens computed by prefill (not reused)"),
    "reused_tokens_total": ("counter", "prompt tokens whose KV state came from the prefix cache"),
    "generated_tokens_total": ("counter", "tokens generated"),
    "ttft_seconds": ("summary", "time from submission to the first generated token"),
    "prefill_seconds": ("summary", "prefill time per generation request"),
    "queue_depth": ("gauge", "requests waiting for the MLX worker"),
    "busy": ("gauge", "1 while the MLX worker runs a request"),
}


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    """Thread-safe counters and sums; :meth:`render` produces Prometheus text format."""

    def __init__(self, prefix: str = "warmturn") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._summaries: dict[str, list[float]] = {}  # name -> [count, sum]

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            s = self._summaries.setdefault(name, [0.0, 0.0])
            s[0] += 1
            s[1] += value

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self, gauges: Mapping[str, float], store_stats: Mapping[str, float] | None = None) -> str:
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            summaries = {k: list(v) for k, v in self._summaries.items()}
        seen: set[str] = set()

        def head(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            kind, help_ = _HELP.get(name, ("gauge", name.replace("_", " ")))
            lines.append(f"# HELP {self.prefix}_{name} {help_}")
            lines.append(f"# TYPE {self.prefix}_{name} {kind}")

        for (name, labels), value in sorted(counters.items()):
            head(name)
            lines.append(f"{self.prefix}_{name}{_labels(dict(labels))} {value:g}")
        for name, (count, total) in sorted(summaries.items()):
            head(name)
            lines.append(f"{self.prefix}_{name}_count {count:g}")
            lines.append(f"{self.prefix}_{name}_sum {total:.6f}")
        for name, value in sorted(gauges.items()):
            head(name)
            lines.append(f"{self.prefix}_{name} {value:g}")
        for name, value in sorted((store_stats or {}).items()):
            metric = "cache_" + "".join(c if c.isalnum() else "_" for c in name)
            head(metric)
            lines.append(f"{self.prefix}_{metric} {float(value):g}")
        return "\n".join(lines) + "\n"


def safe_stats(stats: Callable[[], Mapping[str, float]] | None) -> dict[str, float]:
    """``store.stats()`` filtered to numbers; a failing store never breaks /metrics."""
    if stats is None:
        return {}
    try:
        return {k: float(v) for k, v in stats().items() if isinstance(v, (int, float))}
    except Exception:  # noqa: BLE001 - a failing store never breaks /metrics
        return {}
