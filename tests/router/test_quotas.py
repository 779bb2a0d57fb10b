"""Quotas against both stores: in-process (with a fake clock) and a real Redis server (real time)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
import httpx
import pytest
import redis
from fastapi import Depends, FastAPI

from blockzoo.settings import Settings
from router.errors import APIError, install_error_handlers
from router.principal import Principal
from router.quota_fallback import FallbackQuotas
from router.quota_redis import QuotaStoreUnavailable, RedisQuotas
from router.quotas import (
    BucketQuotas,
    InProcessQuotas,
    QuotaLease,
    QuotaService,
    build_quotas,
    format_reset,
    get_quotas,
)
from tests.router.live_server import free_port
from tests.router.redis_process import RedisProcess

# Redis tests run in real time, so windows are seconds rather than a minute.
WINDOW_S = 1.0


def principal(
    rpm: int | None = None, tpm: int | None = None, concurrent: int | None = None, tenant_id: int = 1
) -> Principal:
    return Principal(tenant_id, f"tenant{tenant_id}", rpm, tpm, concurrent, None, None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    kind: str
    make: Callable[[float], BucketQuotas]
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    made: list[BucketQuotas] = []
    if request.param == "memory":
        clock = FakeClock()

        def make(window: float) -> BucketQuotas:
            made.append(InProcessQuotas(window_seconds=window, clock=clock))
            return made[-1]

        async def advance(seconds: float) -> None:
            clock.now += seconds

    else:
        url: str = request.getfixturevalue("redis_url")

        def make(window: float) -> BucketQuotas:
            made.append(RedisQuotas(url, window_seconds=window))
            return made[-1]

        async def advance(seconds: float) -> None:
            await asyncio.sleep(seconds)

    yield Harness(request.param, make, advance)
    for quotas in made:
        await quotas.close()


def seconds_of(duration: str) -> float:
    """Parses the reset format ("999ms", "1.5s", "6m0s") independently of the code under test."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:(\d+)ms)?", duration)
    assert match is not None and duration, duration
    h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


async def refused(quotas: QuotaService, who: Principal, tokens: int) -> APIError:
    with pytest.raises(APIError) as caught:
        await quotas.acquire(who, tokens)
    assert caught.value.status == 429
    assert caught.value.code == "rate_limit_exceeded"
    return caught.value


def test_reset_format_follows_openai() -> None:
    assert format_reset(0.02) == "20ms"
    assert format_reset(1.0) == "1s"
    assert format_reset(1.5) == "1.5s"
    assert format_reset(360.0) == "6m0s"
    assert format_reset(3723.0) == "1h2m3s"


async def test_requests_limit_refuses_with_headers_then_recovers(harness: Harness) -> None:
    quotas = harness.make(1.5)  # 3 requests per 1.5 s: one comes back every half second
    who = principal(rpm=3)
    remaining = []
    for _ in range(3):
        async with await quotas.acquire(who, 10) as lease:
            remaining.append(lease.headers["x-ratelimit-remaining-requests"])
            assert lease.headers["x-ratelimit-limit-requests"] == "3"
    assert remaining == ["2", "1", "0"]
    assert "x-ratelimit-limit-tokens" not in lease.headers

    err = await refused(quotas, who, 10)
    assert err.headers["retry-after"] == "1"
    assert err.headers["x-ratelimit-limit-requests"] == "3"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1.2 <= seconds_of(err.headers["x-ratelimit-reset-requests"]) <= 1.5
    assert "requests per minute" in err.message

    await harness.advance(0.6)  # refills 1.2 requests
    async with await quotas.acquire(who, 10) as lease:
        assert lease.headers["x-ratelimit-remaining-requests"] == "0"
    await refused(quotas, who, 10)


async def test_tokens_limit_settles_the_estimate_on_release(harness: Harness) -> None:
    # 100 tokens per 10 s: 10 a second, so the real-time (Redis) run may see a token or two refilled.
    quotas = harness.make(10.0)
    who = principal(tpm=100)
    first = await quotas.acquire(who, 60)
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"
    assert "x-ratelimit-limit-requests" not in first.headers

    err = await refused(quotas, who, 60)
    assert "tokens per minute" in err.message
    assert err.headers["retry-after"] == "2"  # 20 tokens short
    assert 40 <= int(err.headers["x-ratelimit-remaining-tokens"]) <= 42

    await first.release(actual_tokens=10)  # 50 tokens come back
    second = await quotas.acquire(who, 60)
    assert 30 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 32

    await second.release(actual_tokens=160)  # 100 more than estimated: the bucket goes into debt
    err = await refused(quotas, who, 1)
    assert err.headers["x-ratelimit-remaining-tokens"] == "0"
    # About 71 tokens short of one, 170 short of full, at 10 tokens a second.
    assert err.headers["retry-after"] in ("7", "8")
    assert 16.0 <= seconds_of(err.headers["x-ratelimit-reset-tokens"]) <= 17.0


async def test_request_larger_than_the_token_limit_is_refused_without_retry(harness: Harness) -> None:
    quotas = harness.make(WINDOW_S)
    err = await refused(quotas, principal(tpm=100), 101)
    assert "too large" in err.message
    assert "retry-after" not in err.headers
    err = await refused(quotas, principal(rpm=0), 1)
    assert "retry-after" not in err.headers


async def test_concurrency_limit_and_release(harness: Harness) -> None:
    quotas = harness.make(WINDOW_S)
    who = principal(concurrent=2)
    a = await quotas.acquire(who, 5)
    b = await quotas.acquire(who, 5)
    err = await refused(quotas, who, 5)
    assert "concurrent" in err.message
    assert err.headers["retry-after"] == "1"
    await a.release(5)
    await a.release(5)  # a second release frees nothing more
    c = await quotas.acquire(who, 5)
    await refused(quotas, who, 5)
    await b.release()
    await c.release()
    leases = [await quotas.acquire(who, 5) for _ in range(2)]
    await refused(quotas, who, 5)
    for lease in leases:
        await lease.release()


async def wait_until_admitted(quotas: QuotaService, who: Principal) -> QuotaLease:
    """The release after a cancellation finishes in the background: give it a moment."""
    for _ in range(100):
        try:
            return await quotas.acquire(who, 1)
        except APIError:
            await asyncio.sleep(0.02)
    pytest.fail("the in-flight slot was never released")


async def test_leases_never_leak_when_the_body_raises_or_is_cancelled(harness: Harness) -> None:
    quotas = harness.make(WINDOW_S)
    who = principal(concurrent=1)
    for _ in range(5):
        with pytest.raises(RuntimeError):
            async with await quotas.acquire(who, 1):
                raise RuntimeError("handler failed")

    started = asyncio.Event()

    async def hold() -> None:
        async with await quotas.acquire(who, 1):
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(hold())
    await started.wait()
    await refused(quotas, who, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await (await wait_until_admitted(quotas, who)).release()

    # anyio cancel scopes (Starlette's, when a streaming client disconnects) cancel every await
    # inside them again, the release's included.
    async def hold_in_scope() -> None:
        with anyio.move_on_after(0.05):
            async with await quotas.acquire(who, 1):
                await anyio.sleep(30)

    await hold_in_scope()
    await (await wait_until_admitted(quotas, who)).release()


@pytest.mark.parametrize("limit", ["rpm", "concurrent"])
async def test_concurrent_acquires_admit_exactly_the_limit(harness: Harness, limit: str) -> None:
    quotas = harness.make(60.0)
    who = principal(rpm=10) if limit == "rpm" else principal(concurrent=10)
    results = await asyncio.gather(*(quotas.acquire(who, 1) for _ in range(50)), return_exceptions=True)
    leases = [r for r in results if isinstance(r, QuotaLease)]
    refusals = [r for r in results if isinstance(r, APIError) and r.status == 429]
    assert (len(leases), len(refusals)) == (10, 40)
    for lease in leases:
        await lease.release()


async def test_tenants_are_limited_separately(harness: Harness) -> None:
    quotas = harness.make(60.0)
    a, b = principal(rpm=1, tenant_id=1), principal(rpm=1, tenant_id=2)
    await (await quotas.acquire(a, 1)).release()
    await refused(quotas, a, 1)
    await (await quotas.acquire(b, 1)).release()


async def test_unlimited_tenant_gets_no_headers(harness: Harness) -> None:
    quotas = harness.make(60.0)
    for _ in range(20):
        async with await quotas.acquire(principal(), 10_000) as lease:
            assert lease.headers == {}


def test_in_process_lock_holds_across_threads() -> None:
    quotas = InProcessQuotas(window_seconds=60.0)
    who = principal(concurrent=10)
    admitted: list[QuotaLease] = []
    barrier = threading.Barrier(50)

    def worker() -> None:
        barrier.wait()
        with contextlib.suppress(APIError):
            admitted.append(asyncio.run(quotas.acquire(who, 1)))

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 10


async def test_redis_processes_share_limits(redis_url: str) -> None:
    # Two services on one Redis stand for two API processes.
    first, second = RedisQuotas(redis_url, window_seconds=60.0), RedisQuotas(redis_url, window_seconds=60.0)
    try:
        who = principal(rpm=10, concurrent=100)
        calls = [(first if i % 2 else second).acquire(who, 1) for i in range(50)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        leases = [r for r in results if isinstance(r, QuotaLease)]
        assert len(leases) == 10
        for lease in leases:
            await lease.release()
    finally:
        await first.close()
        await second.close()


async def test_redis_keys_are_namespaced_and_expire(redis_url: str) -> None:
    quotas = RedisQuotas(redis_url, window_seconds=60.0)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        lease = await quotas.acquire(principal(rpm=5, tpm=1000, concurrent=3, tenant_id=7), 100)
        names = {"bz:q:{7}:rpm", "bz:q:{7}:tpm", "bz:q:{7}:conc", "bz:q:{7}:epoch"}
        assert set(client.keys("*")) == names
        assert client.get("bz:q:{7}:conc") == "1"
        for name in names:
            assert client.pttl(name) > 0
        # A bucket expires once it would be full again: 1 of 5 requests takes 12 s (+1 s slack).
        assert client.pttl("bz:q:{7}:rpm") <= 13_000
        await lease.release(100)
        assert not client.exists("bz:q:{7}:conc")
        # Unlimited tenants never touch Redis.
        await (await quotas.acquire(principal(tenant_id=8), 10)).release()
        assert not client.keys("bz:q:{8}:*")
    finally:
        client.close()
        await quotas.close()


async def test_redis_down_is_unavailable_and_closed_policy_is_a_503() -> None:
    port_with_nothing = "redis://127.0.0.1:1/0"
    quotas = RedisQuotas(port_with_nothing)
    try:
        with pytest.raises(QuotaStoreUnavailable):
            await quotas.acquire(principal(rpm=1), 1)
    finally:
        await quotas.close()
    closed = build_quotas(Settings(redis_url=port_with_nothing, quota_redis_failure="closed"))
    try:
        with pytest.raises(APIError) as caught:
            await closed.acquire(principal(rpm=1), 1)
        assert caught.value.status == 503 and caught.value.headers["retry-after"]
        # Unlimited tenants need no store, so they are never refused for its absence.
        await (await closed.acquire(principal(), 1)).release()
    finally:
        await closed.close()


def test_build_quotas_picks_the_store(redis_url: str) -> None:
    assert isinstance(build_quotas(Settings(redis_url=None)), InProcessQuotas)
    built = build_quotas(Settings(redis_url=redis_url))
    assert isinstance(built, FallbackQuotas) and isinstance(built.primary, RedisQuotas)


async def test_fallback_leases_go_back_to_the_store_that_granted_them(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, free_port())
    server.start()
    quotas = FallbackQuotas(
        RedisQuotas(server.url, window_seconds=60.0), InProcessQuotas(60.0), "local", retry_s=0.2
    )
    who = principal(rpm=100, concurrent=2, tenant_id=3)
    probe = server.client()
    try:
        in_redis = await quotas.acquire(who, 1)
        assert probe.get("bz:q:{3}:conc") == "1"
        server.stop()
        # Redis is gone: the local buckets admit up to the same concurrency limit, and no further.
        local = [await quotas.acquire(who, 1), await quotas.acquire(who, 1)]
        with pytest.raises(APIError) as busy:
            await quotas.acquire(who, 1)
        assert busy.value.status == 429 and quotas.fallbacks == 3
        for lease in local:
            await lease.release(1)
        assert quotas.local.held_leases() == 0
        # The Redis lease's release cannot reach Redis: it stays held until it can.
        await in_redis.release(1)
        assert quotas.held_leases() == 1
        server.start()
        probe = server.client()
        await asyncio.sleep(0.25)
        # Redis restarted empty: the old lease is not in its counter, so replaying its release must
        # not free the slot a new lease took there.
        fresh = await quotas.acquire(who, 1)
        assert quotas.held_leases() == 1 and probe.get("bz:q:{3}:conc") == "1"
        await fresh.release(1)
        assert quotas.held_leases() == 0 and not probe.exists("bz:q:{3}:conc")
    finally:
        probe.close()
        await quotas.close()
        server.stop()


async def test_a_release_lost_in_a_short_outage_is_sent_when_redis_answers(redis_url: str) -> None:
    quotas = RedisQuotas(redis_url, window_seconds=60.0)
    who = principal(rpm=100, concurrent=5, tenant_id=4)
    probe = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        held = await quotas.acquire(who, 1)
        # The same Redis, unreachable for one call: the script the release runs is not there.
        real = quotas._release
        quotas._release = quotas._redis.register_script("return redis.error_reply('ERR outage')")
        await held.release(1)
        quotas._release = real
        assert probe.get("bz:q:{4}:conc") == "1" and quotas.held_leases() == 1
        # The next call that reaches Redis sends it: the counter holds only the new lease.
        other = await quotas.acquire(who, 1)
        assert probe.get("bz:q:{4}:conc") == "1" and quotas.held_leases() == 1
        await other.release(1)
        assert not probe.exists("bz:q:{4}:conc") and quotas.held_leases() == 0
    finally:
        probe.close()
        await quotas.close()


async def test_429_over_http_has_openai_shape_and_headers(harness: Harness) -> None:
    app = FastAPI()
    install_error_handlers(app)
    app.state.quotas = harness.make(60.0)
    who = principal(rpm=1, tpm=50)

    @app.post("/work")
    async def work(quotas: Annotated[QuotaService, Depends(get_quotas)]) -> dict[str, str]:
        async with await quotas.acquire(who, 20) as lease:
            await lease.release(20)
            return lease.headers

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ok = await client.post("/work")
        assert ok.status_code == 200
        assert ok.json()["x-ratelimit-remaining-tokens"] == "30"
        limited = await client.post("/work")
    assert limited.status_code == 429
    error = limited.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    assert limited.headers["retry-after"] == "60"  # one request a minute
    assert limited.headers["x-ratelimit-limit-requests"] == "1"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["x-ratelimit-limit-tokens"] == "50"


async def test_a_hung_redis_costs_one_timeout_then_the_fallback_answers_at_once(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, free_port())
    server.start()
    quotas = FallbackQuotas(
        RedisQuotas(server.url, window_seconds=60.0, socket_timeout_s=0.5),
        InProcessQuotas(60.0),
        "local",
        retry_s=5.0,
    )
    who = principal(rpm=100, concurrent=10, tenant_id=5)
    try:
        await (await quotas.acquire(who, 1)).release(1)
        server.pause()
        started = asyncio.get_running_loop().time()
        first = await quotas.acquire(who, 1)
        assert asyncio.get_running_loop().time() - started < 2.0
        # Within retry_s the hung store is not asked again: no more timeouts to wait out.
        started = asyncio.get_running_loop().time()
        others = [await quotas.acquire(who, 1) for _ in range(5)]
        assert asyncio.get_running_loop().time() - started < 0.2
        assert quotas.fallbacks == 6
        for lease in [first, *others]:
            await lease.release(1)
        assert quotas.held_leases() == 0
    finally:
        server.resume()
        await quotas.close()
        server.stop()


async def test_a_kept_release_is_sent_by_the_next_release_too(redis_url: str) -> None:
    # After a load ends no new request may come to send a kept release; the last releases must.
    quotas = RedisQuotas(redis_url, window_seconds=60.0)
    who = principal(rpm=100, concurrent=5, tenant_id=6)
    probe = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        first, second = await quotas.acquire(who, 1), await quotas.acquire(who, 1)
        real = quotas._release
        quotas._release = quotas._redis.register_script("return redis.error_reply('ERR outage')")
        await first.release(1)
        quotas._release = real
        assert probe.get("bz:q:{6}:conc") == "2" and quotas.held_leases() == 2
        await second.release(1)
        assert not probe.exists("bz:q:{6}:conc") and quotas.held_leases() == 0
    finally:
        probe.close()
        await quotas.close()
