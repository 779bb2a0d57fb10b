"""What quotas do while Redis is unreachable: enforce limits in this process, or refuse with 503.

`FallbackQuotas` asks Redis first. When Redis does not answer, the policy decides:

- "local": the request is admitted or refused by in-process buckets, as a single-process server
  would (so while Redis is down each API process grants a tenant its full limit);
- "closed": a limited request gets a 503 that says the rate limiter is unavailable.

After a failure Redis is skipped for `retry_s`, so an outage costs each request nothing more than the
fallback itself; then the next request tries Redis again, and once it answers every new lease lives
there again. A lease is released to the store that granted it: fallback leases to the in-process
buckets, Redis leases to Redis (kept and resent there by `RedisQuotas` if it is down at release).
`fallbacks` counts each request decided without Redis, for the `blockzoo:quota_fallback` metric.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Literal

from router.errors import APIError
from router.principal import Principal
from router.quota_redis import QuotaStoreUnavailable, RedisQuotas
from router.quotas import InProcessQuotas, Limits, QuotaLease

log = logging.getLogger(__name__)

FailurePolicy = Literal["local", "closed"]


class FallbackQuotas:
    """Redis quotas with a policy for when Redis is unreachable (a `QuotaService`)."""

    def __init__(
        self,
        primary: RedisQuotas,
        local: InProcessQuotas,
        policy: FailurePolicy,
        retry_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not retry_s > 0:
            raise ValueError(f"retry_s must be positive, got {retry_s}")
        self.primary = primary
        self.local = local
        self.policy = policy
        self.retry_s = retry_s
        self.fallbacks = 0
        self._clock = clock
        self._skip_until = 0.0
        self._down = False

    async def acquire(self, principal: Principal, estimated_tokens: int) -> QuotaLease:
        if Limits.of(principal).unlimited:
            # Nothing to count, in Redis or here: never refused, never a fallback.
            return await self.local.acquire(principal, estimated_tokens)
        if self._clock() >= self._skip_until:
            try:
                lease = await self.primary.acquire(principal, estimated_tokens)
            except QuotaStoreUnavailable as exc:
                self._skip_until = self._clock() + self.retry_s
                if not self._down:
                    self._down = True
                    log.error("quota store unreachable, policy %r: %s", self.policy, exc)
            else:
                if self._down:
                    self._down = False
                    log.warning("quota store answers again: limits are enforced in Redis")
                return lease
        self.fallbacks += 1
        if self.policy == "closed":
            raise APIError(
                503,
                "rate limiter unavailable (its store does not answer), so limited requests are refused;"
                " try again later",
                "server_error",
                code="service_unavailable",
                headers={"retry-after": str(max(1, math.ceil(self.retry_s)))},
            )
        return await self.local.acquire(principal, estimated_tokens)

    def held_leases(self) -> int:
        return self.primary.held_leases() + self.local.held_leases()

    async def close(self) -> None:
        await self.primary.close()
