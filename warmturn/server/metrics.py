"""/metrics: the server's counters, histograms and gauges through ``prometheus_client``.

One private registry per :class:`Metrics` (several servers or engines in one process never
share counters). Gauges that describe the engine right now (queue depth, batch size, parked
requests) and the prefix cache's own ``stats()`` are read when /metrics is scraped, by a
collector bound to the engine, so nothing has to keep them up to date.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # no *_created series: start times say nothing a scrape needs

PREFIX = "warmturn"
# Seconds, from a warm turn's tens of milliseconds to a cold 8K prompt's minutes on a CPU.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, float("inf"))


def mlx_memory() -> list[tuple[str, str, float]]:
    """MLX's own allocator figures (bytes): what arrays hold now, what it keeps freed for reuse
    (its buffer cache: part of the process's RSS, reused, not leaked), and the peak."""
    try:
        import mlx.core as mx

        return [("mlx_active_bytes", "bytes MLX arrays hold now", float(mx.get_active_memory())),
                ("mlx_cache_bytes", "bytes MLX keeps freed for reuse (its buffer cache)", float(mx.get_cache_memory())),
                ("mlx_peak_bytes", "the most bytes MLX arrays have held at once", float(mx.get_peak_memory()))]
    except Exception:  # noqa: BLE001 - an MLX without these functions: no such gauges
        return []


class _EngineCollector(Collector):
    """Gauges read from the engine and its store at scrape time."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        e = self.engine
        decoding, prefilling = e.batch_sizes()
        for name, help_, value in (
            ("queue_depth", "requests waiting to join the batch", e.depth),
            ("busy", "1 while any request is in the batch", float(e.busy)),
            ("batch_decoding", "sequences in the decode batch", decoding),
            ("batch_prefilling", "sequences reading their prompt (chunked prefill)", prefilling),
            ("prefill_waiting", "requests admitted and waiting for their turn to read their prompt",
             e.waiting_prefill),
            ("dedup_parked", "requests waiting for another request's prefill of a shared prefix",
             e.parked),
            ("worker_alive", "1 while the MLX worker thread runs", float(e.alive)),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_, value=value)
        for name, help_, value in mlx_memory():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_, value=value)
        family = getattr(e, "cache_family", None)
        if family is not None:
            g = GaugeMetricFamily(f"{PREFIX}_cache_family", "the served model's cache family and the reuse policy "
                                  "that follows (server/kvfamily.py); always 1", labels=["family", "marks"])
            g.add_metric([family.name, "no" if family.name == "attention" else "yes"], 1.0)
            yield g
        for name, value in safe_stats(e.store).items():
            metric = "cache_" + "".join(c if c.isalnum() else "_" for c in name)
            yield GaugeMetricFamily(f"{PREFIX}_{metric}", f"prefix cache stats(): {name}", value=value)


class Metrics:
    """The server's metrics. The engine and the HTTP layer update the attributes directly."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prefill_tokens = Counter(f"{PREFIX}_prefill_tokens", "prompt tokens computed by prefill", registry=r)
        self.reused_tokens = Counter(f"{PREFIX}_reused_tokens",
                                     "prompt tokens whose KV state came from the prefix cache", registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "tokens generated", registry=r)
        self.dedup_waits = Counter(f"{PREFIX}_dedup_waits",
                                   "requests that waited for another's prefill of a shared prefix", registry=r)
        self.dedup_tokens = Counter(f"{PREFIX}_dedup_tokens",
                                    "prompt tokens fetched from the cache by requests that waited (not recomputed)",
                                    registry=r)
        self.preemptions = Counter(f"{PREFIX}_prefill_preemptions",
                                   "prompts that paused mid-prefill (KV kept) so a shorter one went first",
                                   registry=r)
        self.ttft = Histogram(f"{PREFIX}_ttft_seconds", "from the request's arrival to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram(f"{PREFIX}_prefill_seconds", "from joining the batch to the end of prefill",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds",
                                    "from submission to joining the batch (dedup waits included)",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self._collector: _EngineCollector | None = None

    def bind_engine(self, engine: Any) -> None:
        """Report ``engine``'s gauges and its store's stats at scrape time."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = _EngineCollector(engine)
        self.registry.register(self._collector)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def safe_stats(store: Any) -> dict[str, float]:
    """``store.stats()`` filtered to numbers; a failing store never breaks /metrics."""
    if store is None:
        return {}
    try:
        return {k: float(v) for k, v in store.stats().items() if isinstance(v, (int, float))}
    except Exception:  # noqa: BLE001 - a failing store never breaks /metrics
        return {}
