"""A live server wired like `router.server.build_server` (quotas, usage, metrics) for the attack tests.

The quota window is made so long that buckets do not visibly refill during a test, so a bucket's
level moves by exactly what the requests took and gave back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.app import create_app
from router.auth import admin_key_digest
from router.inference import InferenceService
from router.metrics import Metrics
from router.quota_redis import RedisQuotas
from router.quotas import BucketQuotas, InProcessQuotas
from router.routes_health import router as health_router
from router.services import Services
from router.usage import UsageRecorder
from router.usage_buffer import UsageBuffer
from tests.router.live_server import serve
from tests.zoo.zoo_helpers import add_tenant, open_zoo
from zoo.catalog.models import Usage
from zoo.catalog.tenants import TenantQuotas, get_tenant, set_quotas
from zoo.registry import Zoo

# Refill of 1e6 tokens over ~30 years: far below one token during a test.
FROZEN_WINDOW_S = 1e9
TOKENS_PER_MINUTE = 1_000_000
MAX_CONCURRENT = 8


@dataclass
class Stack:
    """A served app and handles on what it accounts into."""

    url: str
    keys: dict[str, str]
    tenant_ids: dict[str, int]
    zoo: Zoo
    inference: InferenceService
    quotas: BucketQuotas
    usage: UsageBuffer
    metrics: Metrics
    redis: redis.Redis | None

    def client(self, tenant: str = "acme", **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=self.keys[tenant],
            max_retries=0,
            **kwargs,  # type: ignore[arg-type]
        )

    def in_flight(self, tenant: str) -> int:
        """The tenant's concurrency count as the quota store holds it."""
        tid = self.tenant_ids[tenant]
        if isinstance(self.quotas, InProcessQuotas):
            return self.quotas._in_flight.get(tid, 0)
        assert isinstance(self.quotas, RedisQuotas) and self.redis is not None
        return int(self.redis.get(self.quotas.key(tid, "conc")) or 0)

    def tokens_taken(self, tenant: str) -> float:
        """How far the tenant's tokens bucket is below full."""
        tid = self.tenant_ids[tenant]
        if isinstance(self.quotas, InProcessQuotas):
            level = self.quotas._level((tid, "tpm"), TOKENS_PER_MINUTE, self.quotas._clock())
            assert level is not None
            return TOKENS_PER_MINUTE - level
        assert isinstance(self.quotas, RedisQuotas) and self.redis is not None
        raw = self.redis.hget(self.quotas.key(tid, "tpm"), "v")
        return 0.0 if raw is None else TOKENS_PER_MINUTE - float(raw)

    def usage_rows(self, tenant: str) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, requests) recorded for the tenant, after a flush."""
        self.usage.flush()
        with self.zoo.sessions() as session:
            found = session.scalars(select(Usage).where(Usage.tenant_id == self.tenant_ids[tenant])).all()
            return (
                sum(u.prompt_tokens for u in found),
                sum(u.completion_tokens for u in found),
                sum(u.requests for u in found),
            )

    def counters(self, tenant: str) -> dict[str, float]:
        """The tenant's request counters on /metrics, summed over models and finish reasons."""
        import httpx

        text = httpx.get(self.url + "/metrics").text
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("tenant") == tenant and sample.name.endswith("_total"):
                    sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
        return sums

    def engine_idle(self) -> bool:
        stats = self.inference.stats()
        return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_usage == 0.0


def wait_for(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


@contextmanager
def live_stack(
    root: Path, tiny_model_factory: TinyModelCache, redis_url: str | None = None
) -> Iterator[Stack]:
    zoo = open_zoo(root / "zoo")
    zoo.add_base("tiny-base", tiny_model_factory("llama", num_layers=2))
    keys = {name: add_tenant(zoo, name) for name in ("acme", "globex")}
    with zoo.sessions() as session, session.begin():
        tenant_ids = {}
        for name in keys:
            set_quotas(
                session,
                name,
                TenantQuotas(tokens_per_minute=TOKENS_PER_MINUTE, max_concurrent=MAX_CONCURRENT),
            )
            tenant_ids[name] = get_tenant(session, name).id
    settings = Settings(data_dir=root / "data", kv_cache_memory=32 << 20, max_model_len=2048, page_size=8)
    inference = InferenceService(settings, zoo)
    quotas: BucketQuotas = (
        RedisQuotas(redis_url, window_seconds=FROZEN_WINDOW_S)
        if redis_url
        else InProcessQuotas(window_seconds=FROZEN_WINDOW_S)
    )
    metrics = Metrics()
    usage = UsageBuffer(UsageRecorder(zoo), interval_s=3600)
    app = create_app(
        Services(settings, zoo, admin_key_digest("admin-secret")),
        inference,
        routers=[health_router],
        state={"quotas": quotas, "metrics": metrics, "usage": usage},
        on_shutdown=[usage.close],
        async_on_shutdown=[quotas.close],
    )
    store = redis.Redis.from_url(redis_url) if redis_url else None
    try:
        with serve(app) as url:
            yield Stack(url, keys, tenant_ids, zoo, inference, quotas, usage, metrics, store)
    finally:
        if store is not None:
            store.close()
