"""Redis stops mid-service and comes back: a live server, the official openai client, a real redis-server.

With `quota_redis_failure="local"` (the default) requests go on under in-process limits while Redis is
down, a metric counts each fallback, and once Redis answers again the limits live in Redis once more.
With "closed" a limited request gets a 503 that says why. Either way no quota lease stays held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.server import build_server
from tests.router.live_server import free_port, serve
from tests.router.redis_process import RedisProcess
from tests.zoo.zoo_helpers import add_tenant
from zoo.catalog.tenants import TenantQuotas, set_quotas
from zoo.registry import Zoo

RETRY_S = 0.3


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own, so that stopping it disturbs no other test."""
    server = RedisProcess(tmp_path, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def metric(base_url: str, name: str) -> float:
    """The sum of a metric's samples in /metrics (0 when it is absent)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def tenant_id(zoo: Zoo, name: str) -> int:
    from zoo.catalog.tenants import get_tenant

    with zoo.sessions() as session:
        return get_tenant(session, name).id


def build(
    tmp_path: Path, redis_url: str, policy: str, tiny: TinyModelCache
) -> tuple[object, Zoo, dict[str, str]]:
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        quota_redis_failure=policy,  # type: ignore[arg-type]
        quota_redis_retry_s=RETRY_S,
        # Generous: on a loaded machine a starved event loop must not look like a Redis outage here.
        quota_redis_timeout_s=10.0,
        kv_cache_memory=8 << 20,
        admin_key="admin-key",
    )
    built = build_server(settings)
    zoo = built.inference.zoo
    zoo.add_base("base", tiny("llama"))
    keys = {"busy": add_tenant(zoo, "busy"), "strict": add_tenant(zoo, "strict")}
    with zoo.sessions() as session, session.begin():
        set_quotas(session, "busy", TenantQuotas(requests_per_minute=10_000, max_concurrent=50))
        set_quotas(session, "strict", TenantQuotas(requests_per_minute=3))
    return built.app, zoo, keys


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_redis_down_falls_back_to_local_limits_and_recovers(
    tmp_path: Path, own_redis: RedisProcess, tiny_model_factory: TinyModelCache
) -> None:
    app, zoo, keys = build(tmp_path, own_redis.url, "local", tiny_model_factory)
    busy, strict = tenant_id(zoo, "busy"), tenant_id(zoo, "strict")
    probe = own_redis.client()
    with serve(app) as url:  # type: ignore[arg-type]
        client(url, keys["busy"]).completions.create(model="base", prompt="a", max_tokens=2)
        assert probe.exists(f"bz:q:{{{busy}}}:rpm")
        assert metric(url, "blockzoo:quota_fallback_total") == 0

        own_redis.stop()
        # Served through the outage, streamed and not, and under the in-process limits, not none.
        for _ in range(3):
            out = client(url, keys["busy"]).completions.create(model="base", prompt="a", max_tokens=3)
            assert out.usage is not None and out.usage.completion_tokens == 3
        stream = client(url, keys["busy"]).completions.create(
            model="base", prompt="a", max_tokens=4, stream=True
        )
        assert sum(1 for _ in stream) >= 4
        for _ in range(3):
            client(url, keys["strict"]).completions.create(model="base", prompt="a", max_tokens=1)
        with pytest.raises(openai.RateLimitError):
            client(url, keys["strict"]).completions.create(model="base", prompt="a", max_tokens=1)
        fallbacks = metric(url, "blockzoo:quota_fallback_total")
        assert fallbacks >= 1
        assert metric(url, "blockzoo:quota_leases_held") == 0

        own_redis.start()
        time.sleep(RETRY_S * 2)
        probe = own_redis.client()
        assert not probe.keys("*")
        client(url, keys["busy"]).completions.create(model="base", prompt="a", max_tokens=2)
        # Enforced in Redis again: its buckets are back, and the strict tenant's fresh Redis bucket
        # admits three more and then refuses.
        assert probe.exists(f"bz:q:{{{busy}}}:rpm")
        for _ in range(3):
            client(url, keys["strict"]).completions.create(model="base", prompt="a", max_tokens=1)
        with pytest.raises(openai.RateLimitError):
            client(url, keys["strict"]).completions.create(model="base", prompt="a", max_tokens=1)
        assert probe.exists(f"bz:q:{{{strict}}}:rpm")
        assert metric(url, "blockzoo:quota_fallback_total") == fallbacks
        assert metric(url, "blockzoo:quota_leases_held") == 0
        assert not probe.keys("*:conc")
    probe.close()


def test_redis_down_closed_policy_answers_503_then_recovers(
    tmp_path: Path, own_redis: RedisProcess, tiny_model_factory: TinyModelCache
) -> None:
    app, _, keys = build(tmp_path, own_redis.url, "closed", tiny_model_factory)
    with serve(app) as url:  # type: ignore[arg-type]
        client(url, keys["busy"]).completions.create(model="base", prompt="a", max_tokens=2)
        own_redis.stop()
        with pytest.raises(openai.APIStatusError) as refused:
            client(url, keys["busy"]).completions.create(model="base", prompt="a", max_tokens=2)
        assert refused.value.status_code == 503
        assert "rate limiter" in refused.value.message and "unavailable" in refused.value.message
        assert refused.value.response.headers.get("retry-after")
        assert metric(url, "blockzoo:quota_fallback_total") >= 1
        own_redis.start()
        time.sleep(RETRY_S * 2)
        out = client(url, keys["busy"]).completions.create(model="base", prompt="a", max_tokens=2)
        assert out.usage is not None and out.usage.completion_tokens == 2
        assert metric(url, "blockzoo:quota_leases_held") == 0


def test_redis_dies_under_streams_in_flight_and_no_lease_is_left(
    tmp_path: Path, own_redis: RedisProcess, tiny_model_factory: TinyModelCache
) -> None:
    app, zoo, keys = build(tmp_path, own_redis.url, "local", tiny_model_factory)
    busy = tenant_id(zoo, "busy")
    started = threading.Barrier(17)

    def stream(tokens: int, wait: bool) -> bool:
        chunks = client(url, keys["busy"]).completions.create(
            model="base", prompt="load", max_tokens=tokens, stream=True, extra_body={"ignore_eos": True}
        )
        finished = False
        for i, chunk in enumerate(chunks):
            if i == 0 and wait:
                started.wait(timeout=60)
            finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
        return finished

    with serve(app) as url, ThreadPoolExecutor(32) as pool:  # type: ignore[arg-type]
        in_redis = [pool.submit(stream, 300, True) for _ in range(16)]
        started.wait(timeout=60)
        probe = own_redis.client()
        assert int(probe.get(f"bz:q:{{{busy}}}:conc") or 0) == 16
        own_redis.stop()
        # Mid-load: new streams start under the fallback while the first ones run on.
        in_fallback = [pool.submit(stream, 20, False) for _ in range(16)]
        assert all(f.result(timeout=120) for f in in_redis + in_fallback)
        assert metric(url, "blockzoo:quota_fallback_total") >= 16
        # The Redis leases' releases could not be sent: held until Redis answers.
        assert metric(url, "blockzoo:quota_leases_held") == 16
        own_redis.start()
        time.sleep(RETRY_S * 2)
        client(url, keys["busy"]).completions.create(model="base", prompt="a", max_tokens=1)
        assert metric(url, "blockzoo:quota_leases_held") == 0
        # Redis came back empty: the replayed releases did not touch the new counter.
        assert not own_redis.client().exists(f"bz:q:{{{busy}}}:conc")
