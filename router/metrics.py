"""Prometheus metrics with vLLM's names under a `blockzoo:` prefix, in a registry of their own.

Each `Metrics` owns its `CollectorRegistry` (never the process-wide default), so several apps or tests
in one process keep separate counts. Request metrics carry `model_name` and `tenant`; engine metrics
carry `engine`, the instance they describe.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from fastapi import Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "blockzoo:"

# vLLM's buckets, so dashboards built for vLLM read these the same way.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def one_two_five_buckets(maximum: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, … up to `maximum` (vLLM's buckets for token counts)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > maximum:
                return tuple(buckets)
            buckets.append(float(value))
        exponent += 1


REQUEST = ("model_name", "tenant")
ENGINE = ("engine",)


class Metrics:
    """The server's metrics; `observe_request` after each request, `set_engine_stats` from the engine."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_tokens_bucket: int = 100_000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.num_requests_running = Gauge(
            PREFIX + "num_requests_running", "Requests running on the engine.", ENGINE, registry=r
        )
        self.num_requests_waiting = Gauge(
            PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", ENGINE, registry=r
        )
        self.kv_cache_usage_perc = Gauge(
            PREFIX + "kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", ENGINE, registry=r
        )
        self.resident_block_bytes = Gauge(
            PREFIX + "resident_block_bytes",
            "Bytes of weight blocks resident on the engine.",
            ENGINE,
            registry=r,
        )
        self.block_hits = Counter(
            PREFIX + "block_residency_hits", "Block lookups served by a resident block.", ENGINE, registry=r
        )
        self.block_misses = Counter(
            PREFIX + "block_residency_misses", "Block lookups that had to load the block.", ENGINE, registry=r
        )
        self.block_load_seconds = Counter(
            PREFIX + "block_load_seconds", "Seconds spent loading blocks into the budget.", ENGINE, registry=r
        )
        self.num_preemptions = Counter(
            PREFIX + "num_preemptions", "Requests preempted by the scheduler.", ENGINE, registry=r
        )
        self.prefix_cache_queries = Counter(
            PREFIX + "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            ENGINE,
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", ENGINE, registry=r
        )
        self.cross_model_kv_hits = Counter(
            PREFIX + "kv_cross_model_hits",
            "Prompt tokens whose lower layers' KV pages came from another model's request (KV segments).",
            ENGINE,
            registry=r,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed.", REQUEST, registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", REQUEST, registry=r
        )
        self.request_success = Counter(
            PREFIX + "request_success",
            "Finished requests, by finish reason.",
            (*REQUEST, "finished_reason"),
            registry=r,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from arrival to the first token.",
            REQUEST,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Seconds between consecutive output tokens.",
            REQUEST,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Seconds from arrival to the last token.",
            REQUEST,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        token_buckets = one_two_five_buckets(max_tokens_bucket)
        self.request_prompt_tokens = Histogram(
            PREFIX + "request_prompt_tokens",
            "Prompt tokens per request.",
            REQUEST,
            buckets=token_buckets,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            PREFIX + "request_generation_tokens",
            "Generated tokens per request.",
            REQUEST,
            buckets=token_buckets,
            registry=r,
        )
        self.kv_pages_free = Gauge(
            PREFIX + "kv_pages_free",
            "KV-cache pages no request holds (evictable prefix-cache pages count as free).",
            ENGINE,
            registry=r,
        )
        self.kv_pages_total = Gauge(PREFIX + "kv_pages_total", "KV-cache pages in all.", ENGINE, registry=r)
        self.quota_leases_held = Gauge(
            PREFIX + "quota_leases_held",
            "Quota leases (concurrency slots) this process holds: requests admitted and not yet released.",
            registry=r,
        )
        self.quota_fallback = Counter(
            PREFIX + "quota_fallback",
            "Requests whose quota was decided without Redis because it did not answer"
            " (admitted by in-process limits, or refused with 503 under the 'closed' policy).",
            registry=r,
        )
        # The engine reports running totals; counters advance by the difference from the last report.
        self._lock = threading.Lock()
        self._last_totals: dict[tuple[str, str], float] = {}

    def observe_request(
        self,
        tenant: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        itl_s: Sequence[float],
        e2e_s: float,
        finish_reason: str,
    ) -> None:
        """Record one finished request (`ttft_s` None when it ended before its first token)."""
        labels = {"model_name": model, "tenant": tenant}
        self.prompt_tokens.labels(**labels).inc(prompt_tokens)
        self.generation_tokens.labels(**labels).inc(completion_tokens)
        self.request_success.labels(**labels, finished_reason=finish_reason).inc()
        if ttft_s is not None:
            self.time_to_first_token.labels(**labels).observe(ttft_s)
        itl = self.inter_token_latency.labels(**labels)
        for gap in itl_s:
            itl.observe(gap)
        self.e2e_request_latency.labels(**labels).observe(e2e_s)
        self.request_prompt_tokens.labels(**labels).observe(prompt_tokens)
        self.request_generation_tokens.labels(**labels).observe(completion_tokens)

    def set_engine_stats(
        self,
        running: int,
        waiting: int,
        kv_usage: float,
        resident_bytes: int,
        preemptions_total: int,
        prefix_queries_total: int,
        prefix_hits_total: int,
        cross_model_kv_hits_total: int = 0,
        engine: str = "0",
    ) -> None:
        """Set the engine gauges; the `*_total` arguments are the engine's running totals."""
        self.num_requests_running.labels(engine).set(running)
        self.num_requests_waiting.labels(engine).set(waiting)
        self.kv_cache_usage_perc.labels(engine).set(kv_usage)
        self.resident_block_bytes.labels(engine).set(resident_bytes)
        with self._lock:
            self._advance(self.num_preemptions, engine, "preemptions", preemptions_total)
            self._advance(self.prefix_cache_queries, engine, "prefix_queries", prefix_queries_total)
            self._advance(self.prefix_cache_hits, engine, "prefix_hits", prefix_hits_total)
            self._advance(self.cross_model_kv_hits, engine, "cross_model_kv_hits", cross_model_kv_hits_total)

    def set_residency_stats(
        self, hits_total: int, misses_total: int, load_seconds_total: float, engine: str = "0"
    ) -> None:
        """Block residency counters, given as running totals like `set_engine_stats`."""
        with self._lock:
            self._advance(self.block_hits, engine, "block_hits", hits_total)
            self._advance(self.block_misses, engine, "block_misses", misses_total)
            self._advance(self.block_load_seconds, engine, "block_load_seconds", load_seconds_total)

    def set_kv_pages(self, free: int, total: int, engine: str = "0") -> None:
        """The engine's KV page pool: pages free (cached-but-evictable included) and in all."""
        self.kv_pages_free.labels(engine).set(free)
        self.kv_pages_total.labels(engine).set(total)

    def set_quota_stats(self, leases_held: int, fallbacks_total: int) -> None:
        """Quota leases held now, and the running total of requests decided without Redis."""
        self.quota_leases_held.set(leases_held)
        with self._lock:
            last = self._last_totals.get(("", "quota_fallback"), 0.0)
            step = fallbacks_total - last if fallbacks_total >= last else fallbacks_total
            if step > 0:
                self.quota_fallback.inc(step)
            self._last_totals[("", "quota_fallback")] = fallbacks_total

    def _advance(self, counter: Counter, engine: str, name: str, total: float) -> None:
        last = self._last_totals.get((engine, name), 0.0)
        # A total below the last one means the engine restarted and counts from zero again.
        step = total - last if total >= last else total
        if step > 0:
            counter.labels(engine).inc(step)
        self._last_totals[(engine, name)] = total

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (serve with `content_type`)."""
        return generate_latest(self.registry)


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics
