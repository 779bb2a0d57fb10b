"""Per-tenant rate quotas: requests and tokens per minute (token buckets) and concurrent requests.

Each limited quantity is a token bucket holding up to `limit` units that refills at `limit` units per
`window_seconds` (60 in production; tests shorten it). A request takes one unit from the requests
bucket and its estimated tokens from the tokens bucket, and counts as one in-flight request until its
`QuotaLease` is released; releasing settles the tokens bucket by the difference between the estimate
and what was really used (a refund, or debt that later requests wait off).

`InProcessQuotas` keeps the buckets in this process; `RedisQuotas` (router/quota_redis.py) keeps them
in Redis so several API processes share one limit, behind `FallbackQuotas` (router/quota_fallback.py),
which applies the `quota_redis_failure` policy while Redis is unreachable. Routes use a lease as an
async context manager so the in-flight count is released however the body ends:

    lease = await quotas.acquire(principal, estimated_tokens)
    async with lease:
        ...
        await lease.release(actual_tokens)
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol

from fastapi import Request

from router.errors import APIError
from router.principal import Principal

if TYPE_CHECKING:
    from blockzoo.settings import Settings

DEFAULT_WINDOW_SECONDS = 60.0
# With no bucket to compute it from, a client refused for concurrency is told to retry after this.
CONCURRENCY_RETRY_SECONDS = 1.0

Reason = Literal["requests", "tokens", "concurrent"]


@dataclass(frozen=True)
class Limits:
    """A tenant's limits per window; None means unlimited."""

    requests: int | None
    tokens: int | None
    concurrent: int | None

    @classmethod
    def of(cls, principal: Principal) -> Limits:
        return cls(principal.requests_per_minute, principal.tokens_per_minute, principal.max_concurrent)

    @property
    def unlimited(self) -> bool:
        return self.requests is None and self.tokens is None and self.concurrent is None


@dataclass(frozen=True)
class QuotaState:
    """The outcome of one attempt: buckets' remaining units and seconds until full, and, when refused,
    which limit refused it and how long to wait. Remaining is None for an unlimited quantity."""

    allowed: bool
    requests_remaining: float | None
    requests_reset_s: float
    tokens_remaining: float | None
    tokens_reset_s: float
    retry_after_s: float
    reason: Reason | None
    # The store's tag for the life of the concurrency counter this grant was counted in (Redis only).
    epoch: str | None = None


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's `x-ratelimit-reset-*` headers write it: "20ms", "1.5s", "6m0s"."""
    seconds = max(0.0, seconds)
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def rate_limit_headers(limits: Limits, state: QuotaState) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the limited quantities."""
    headers: dict[str, str] = {}
    for name, limit, remaining, reset in (
        ("requests", limits.requests, state.requests_remaining, state.requests_reset_s),
        ("tokens", limits.tokens, state.tokens_remaining, state.tokens_reset_s),
    ):
        if limit is None or remaining is None:
            continue
        headers[f"x-ratelimit-limit-{name}"] = str(limit)
        headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(remaining)))
        headers[f"x-ratelimit-reset-{name}"] = format_reset(reset)
    return headers


def _refusal(limits: Limits, state: QuotaState, tenant: str, cost: int) -> APIError:
    headers = rate_limit_headers(limits, state)
    headers["retry-after"] = str(max(1, math.ceil(state.retry_after_s)))
    wait = format_reset(state.retry_after_s)
    if state.reason == "concurrent":
        message = f"too many concurrent requests for tenant {tenant!r}: limit {limits.concurrent}"
    elif state.reason == "tokens":
        message = f"rate limit reached for tokens per minute: limit {limits.tokens}, requested {cost}"
    else:
        message = f"rate limit reached for requests per minute: limit {limits.requests}"
    return APIError(
        429,
        f"{message}; please try again in {wait}",
        "rate_limit_error",
        code="rate_limit_exceeded",
        headers=headers,
    )


def _never_fits(limits: Limits, tenant: str, cost: int) -> APIError | None:
    """The error for a request no amount of waiting admits (a zero limit, or more tokens than the
    bucket holds); such a refusal has no `retry-after`, since retrying cannot help."""
    if limits.requests == 0 or limits.concurrent == 0:
        message = f"tenant {tenant!r} has a request quota of 0"
    elif limits.tokens is not None and cost > limits.tokens:
        message = f"request too large: needs {cost} tokens, tenant limit is {limits.tokens} tokens per minute"
    else:
        return None
    headers = {} if limits.tokens is None else {"x-ratelimit-limit-tokens": str(limits.tokens)}
    if limits.requests is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.requests)
    return APIError(429, message, "rate_limit_error", code="rate_limit_exceeded", headers=headers)


Releaser = Callable[[int], Awaitable[None]]


class QuotaLease:
    """A granted request: its `headers` for the response, and its in-flight slot until released.

    Releasing is idempotent and runs to completion even when the caller is cancelled (a client
    disconnecting mid-stream), so the in-flight count cannot leak.
    """

    def __init__(self, headers: dict[str, str], estimated_tokens: int, releaser: Releaser | None) -> None:
        self.headers = headers
        self.estimated_tokens = estimated_tokens
        self._releaser = releaser
        self._task: asyncio.Future[None] | None = None

    @property
    def released(self) -> bool:
        return self._task is not None or self._releaser is None

    async def release(self, actual_tokens: int | None = None) -> None:
        """Free the in-flight slot and settle tokens: `actual_tokens` None keeps the estimate."""
        if self._task is not None:
            await asyncio.shield(self._task)
            return
        if self._releaser is None:
            return
        if actual_tokens is not None and actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, got {actual_tokens}")
        refund = 0 if actual_tokens is None else self.estimated_tokens - actual_tokens
        # A task, awaited through shield: cancelling the caller cannot stop the release half-way.
        self._task = asyncio.ensure_future(self._releaser(refund))
        await asyncio.shield(self._task)

    async def __aenter__(self) -> QuotaLease:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


class QuotaService(Protocol):
    """Admits or refuses a tenant's request against its limits."""

    async def acquire(self, principal: Principal, estimated_tokens: int) -> QuotaLease:
        """A lease for one request, or APIError 429 (`rate_limit_exceeded`) with rate-limit headers."""
        ...

    def held_leases(self) -> int:
        """Leases granted and not yet released (unlimited tenants' leases hold nothing)."""
        ...

    async def close(self) -> None: ...


class BucketQuotas(ABC):
    """The `acquire` logic shared by both stores; subclasses say how buckets are read and written."""

    def __init__(self, window_seconds: float) -> None:
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be positive, got {window_seconds}")
        self.window_seconds = float(window_seconds)
        self._held = 0

    def held_leases(self) -> int:
        return self._held

    async def acquire(self, principal: Principal, estimated_tokens: int) -> QuotaLease:
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be >= 0, got {estimated_tokens}")
        limits = Limits.of(principal)
        if limits.unlimited:
            return QuotaLease({}, estimated_tokens, None)
        never = _never_fits(limits, principal.tenant, estimated_tokens)
        if never is not None:
            raise never
        state = await self._take(principal.tenant_id, limits, estimated_tokens)
        if not state.allowed:
            raise _refusal(limits, state, principal.tenant, estimated_tokens)
        tenant_id, epoch = principal.tenant_id, state.epoch
        self._held += 1

        async def release(refund: int) -> None:
            self._held -= 1
            await self._give_back(tenant_id, limits, refund, epoch)

        return QuotaLease(rate_limit_headers(limits, state), estimated_tokens, release)

    @abstractmethod
    async def _take(self, tenant_id: int, limits: Limits, cost: int) -> QuotaState:
        """Atomically check every limit and, when all admit it, take one request, `cost` tokens and
        one in-flight slot."""

    @abstractmethod
    async def _give_back(self, tenant_id: int, limits: Limits, refund: int, epoch: str | None) -> None:
        """Free one in-flight slot (counted in `epoch`, the grant's) and add `refund` tokens (negative:
        debt) to the tokens bucket."""

    async def close(self) -> None:
        return None


@dataclass
class _Bucket:
    level: float
    stamp: float


class InProcessQuotas(BucketQuotas):
    """Buckets in a dict under a lock: right for one API process (`clock` is injectable for tests)."""

    def __init__(
        self, window_seconds: float = DEFAULT_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(window_seconds)
        self._clock = clock
        # A threading lock, not an asyncio one: nothing awaits inside, and sync code may call in too.
        self._lock = threading.Lock()
        self._buckets: dict[tuple[int, str], _Bucket] = {}
        self._in_flight: dict[int, int] = {}

    def _level(self, key: tuple[int, str], cap: int | None, now: float) -> float | None:
        if cap is None:
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(cap)
        return min(float(cap), bucket.level + max(0.0, now - bucket.stamp) * cap / self.window_seconds)

    def _reset(self, cap: int | None, level: float | None) -> float:
        if cap is None or level is None:
            return 0.0
        return max(0.0, (cap - level) * self.window_seconds / cap)

    def _wait(self, cap: int | None, level: float | None, need: float) -> float:
        if cap is None or level is None or level >= need:
            return 0.0
        return (need - level) * self.window_seconds / cap

    async def _take(self, tenant_id: int, limits: Limits, cost: int) -> QuotaState:
        with self._lock:
            now = self._clock()
            requests = self._level((tenant_id, "rpm"), limits.requests, now)
            tokens = self._level((tenant_id, "tpm"), limits.tokens, now)
            in_flight = self._in_flight.get(tenant_id, 0)
            request_wait = self._wait(limits.requests, requests, 1.0)
            token_wait = self._wait(limits.tokens, tokens, float(cost))
            busy = limits.concurrent is not None and in_flight >= limits.concurrent
            reason: Reason | None = None
            if request_wait > 0:
                reason = "requests"
            elif token_wait > 0:
                reason = "tokens"
            elif busy:
                reason = "concurrent"
            if reason is None:
                if requests is not None:
                    requests -= 1.0
                    self._buckets[(tenant_id, "rpm")] = _Bucket(requests, now)
                if tokens is not None:
                    tokens -= cost
                    self._buckets[(tenant_id, "tpm")] = _Bucket(tokens, now)
                self._in_flight[tenant_id] = in_flight + 1
            retry = max(request_wait, token_wait, CONCURRENCY_RETRY_SECONDS if busy else 0.0)
            return QuotaState(
                reason is None,
                requests,
                self._reset(limits.requests, requests),
                tokens,
                self._reset(limits.tokens, tokens),
                retry,
                reason,
            )

    async def _give_back(self, tenant_id: int, limits: Limits, refund: int, epoch: str | None) -> None:
        with self._lock:
            in_flight = self._in_flight.get(tenant_id, 0) - 1
            if in_flight > 0:
                self._in_flight[tenant_id] = in_flight
            else:
                self._in_flight.pop(tenant_id, None)
            if refund and limits.tokens is not None:
                now = self._clock()
                tokens = self._level((tenant_id, "tpm"), limits.tokens, now)
                if tokens is not None:
                    self._buckets[(tenant_id, "tpm")] = _Bucket(
                        min(float(limits.tokens), tokens + refund), now
                    )


def build_quotas(settings: Settings, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> QuotaService:
    """Redis quotas when `settings.redis_url` is set (several API processes share them), behind the
    `quota_redis_failure` policy for when Redis is unreachable; else in-process."""
    if settings.redis_url:
        # Imported here: both build on this module.
        from router.quota_fallback import FallbackQuotas
        from router.quota_redis import RedisQuotas

        return FallbackQuotas(
            RedisQuotas(
                settings.redis_url,
                window_seconds=window_seconds,
                socket_timeout_s=settings.quota_redis_timeout_s,
            ),
            InProcessQuotas(window_seconds=window_seconds),
            settings.quota_redis_failure,
            settings.quota_redis_retry_s,
        )
    return InProcessQuotas(window_seconds=window_seconds)


def get_quotas(request: Request) -> QuotaService:
    quotas: QuotaService = request.app.state.quotas
    return quotas
