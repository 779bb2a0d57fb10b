"""Quotas in Redis, shared by every API process: one atomic Lua script per acquire and per release.

A tenant's keys are `bz:q:{<tenant id>}:rpm`, `…:tpm` (hashes: bucket level `v` and time `t` in ms),
`…:conc` (in-flight count) and `…:epoch` (which life of the counter a lease was counted in). The braces
are a Redis Cluster hash tag: a tenant's keys share a slot, which a multi-key script needs. Time comes
from the Redis server (`TIME`), so the API processes' clocks do not have to agree. Buckets expire once
they would have refilled, so idle tenants cost no memory; the in-flight counter gets a TTL as a safety
net against a process dying mid-request.

A release that cannot reach Redis is kept and sent again once Redis answers, so a short outage leaks
no concurrency. The epoch makes that replay safe: a Redis that restarted empty has a new epoch, and
a lease counted in the old one no longer decrements the new counter (it was never counted there).
An unreachable Redis raises `QuotaStoreUnavailable`; `router/quota_fallback.py` decides what then.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.quotas import DEFAULT_WINDOW_SECONDS, BucketQuotas, Limits, QuotaState, Reason

log = logging.getLogger(__name__)

DEFAULT_IN_FLIGHT_TTL_SECONDS = 900.0

# Limits arrive as numbers, -1 for unlimited; a zero limit never reaches the script (BucketQuotas
# refuses it first), so the divisions by a capacity are safe.
_PRELUDE = """
local window = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000

local function level(key, cap)
  if cap < 0 then return nil end
  local h = redis.call('HMGET', key, 'v', 't')
  local v, t = tonumber(h[1]), tonumber(h[2])
  if v == nil or t == nil then return cap end
  v = v + math.max(0, now - t) * cap / window
  if v > cap then v = cap end
  return v
end

local function store(key, cap, v)
  redis.call('HSET', key, 'v', string.format('%.6f', v), 't', string.format('%.3f', now))
  -- Once full again the bucket equals a missing one, so it may expire then.
  redis.call('PEXPIRE', key, math.ceil((cap - v) * window / cap) + 1000)
end

local function reset_ms(cap, v)
  if v == nil then return 0 end
  return math.ceil((cap - v) * window / cap)
end

local function floor_or_none(v)
  if v == nil then return -1 end
  return math.floor(math.max(v, 0))
end
"""

# KEYS: rpm, tpm, conc, epoch.  ARGV: window ms, request limit, token limit, concurrency limit, cost,
# conc ttl ms, a fresh epoch (used when the tenant has none).
# Returns {allowed, requests left, requests reset ms, tokens left, tokens reset ms, retry ms, reason, epoch}
# with reason 0 none, 1 requests, 2 tokens, 3 concurrent, and epoch '' when refused.
_ACQUIRE = (
    _PRELUDE
    + """
local rcap, tcap, ccap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cost, conc_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local r = level(KEYS[1], rcap)
local tk = level(KEYS[2], tcap)
local c = tonumber(redis.call('GET', KEYS[3]) or '0')
local epoch = nil
local rwait, twait, reason = 0, 0, 0
if r ~= nil and r < 1 then rwait = (1 - r) * window / rcap end
if tk ~= nil and tk < cost then twait = (cost - tk) * window / tcap end
local busy = ccap >= 0 and c >= ccap
if rwait > 0 then reason = 1 elseif twait > 0 then reason = 2 elseif busy then reason = 3 end
if reason == 0 then
  if r ~= nil then r = r - 1; store(KEYS[1], rcap, r) end
  if tk ~= nil then tk = tk - cost; store(KEYS[2], tcap, tk) end
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], conc_ttl)
  epoch = redis.call('GET', KEYS[4]) or ARGV[7]
  redis.call('SET', KEYS[4], epoch, 'PX', conc_ttl)
end
local wait = math.max(rwait, twait)
if busy and wait < 1000 then wait = 1000 end
return {reason == 0 and 1 or 0, floor_or_none(r), reset_ms(rcap, r), floor_or_none(tk), reset_ms(tcap, tk),
        math.ceil(wait), reason, epoch or ''}
"""
)

# KEYS: tpm, conc, epoch.  ARGV: window ms, token limit, tokens to add back (negative: debt), lease epoch.
_RELEASE = (
    _PRELUDE
    + """
local tcap, refund = tonumber(ARGV[2]), tonumber(ARGV[3])
if tcap >= 0 and refund ~= 0 then
  local tk = level(KEYS[1], tcap) + refund
  if tk > tcap then tk = tcap end
  store(KEYS[1], tcap, tk)
end
-- A lease counted in an earlier life of the counter (Redis restarted empty since) is not in this one.
if redis.call('GET', KEYS[3]) == ARGV[4] then
  local c = tonumber(redis.call('GET', KEYS[2]) or '0')
  -- A counter that expired under a long request must not go negative.
  if c > 1 then redis.call('DECR', KEYS[2]) else redis.call('DEL', KEYS[2]) end
end
return 1
"""
)

_REASONS: dict[int, Reason] = {1: "requests", 2: "tokens", 3: "concurrent"}
# Redis answers a script in well under a millisecond; one that does not answer within this is down.
DEFAULT_SOCKET_TIMEOUT_S = 2.0


class QuotaStoreUnavailable(Exception):
    """Redis did not answer; the caller decides whether to fall back or refuse."""


def _limit(value: int | None) -> int:
    return -1 if value is None else value


@dataclass(frozen=True)
class _PendingRelease:
    tenant_id: int
    limits: Limits
    refund: int
    epoch: str | None


class RedisQuotas(BucketQuotas):
    """Token buckets and in-flight counters in Redis, for several API processes sharing limits."""

    def __init__(
        self,
        redis_url: str,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        in_flight_ttl_seconds: float = DEFAULT_IN_FLIGHT_TTL_SECONDS,
        key_prefix: str = "bz:q",
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    ) -> None:
        super().__init__(window_seconds)
        if not in_flight_ttl_seconds > 0:
            raise ValueError(f"in_flight_ttl_seconds must be positive, got {in_flight_ttl_seconds}")
        self.key_prefix = key_prefix
        self._in_flight_ttl_ms = math.ceil(in_flight_ttl_seconds * 1000)
        self._window_ms = self.window_seconds * 1000
        self._redis: Redis = Redis.from_url(
            redis_url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        # register_script runs EVALSHA and loads the script when the server does not know it yet.
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        # Releases that could not reach Redis, sent again after the next call that does.
        self._pending: list[_PendingRelease] = []

    def key(self, tenant_id: int, kind: str) -> str:
        """The Redis key of one of a tenant's counters: kind is "rpm", "tpm", "conc" or "epoch"."""
        return f"{self.key_prefix}:{{{tenant_id}}}:{kind}"

    def held_leases(self) -> int:
        # Pending releases are still counted in Redis, so they are still held.
        return super().held_leases() + len(self._pending)

    async def _take(self, tenant_id: int, limits: Limits, cost: int) -> QuotaState:
        keys = [self.key(tenant_id, k) for k in ("rpm", "tpm", "conc", "epoch")]
        args: list[float | str] = [
            self._window_ms,
            _limit(limits.requests),
            _limit(limits.tokens),
            _limit(limits.concurrent),
            cost,
            self._in_flight_ttl_ms,
            secrets.token_hex(8),
        ]
        try:
            reply = await self._acquire(keys=keys, args=args)
        except RedisError as exc:
            raise QuotaStoreUnavailable(str(exc)) from exc
        allowed, r_left, r_reset, t_left, t_reset, wait, reason = (int(x) for x in reply[:7])
        epoch = reply[7].decode() if isinstance(reply[7], bytes) else str(reply[7])
        await self._send_pending()
        return QuotaState(
            allowed == 1,
            None if r_left < 0 else float(r_left),
            r_reset / 1000,
            None if t_left < 0 else float(t_left),
            t_reset / 1000,
            wait / 1000,
            _REASONS.get(reason),
            epoch or None,
        )

    async def _give_back(self, tenant_id: int, limits: Limits, refund: int, epoch: str | None) -> None:
        release = _PendingRelease(tenant_id, limits, refund, epoch)
        if await self._send(release):
            # Redis answers again: send what waited, even if no new request comes to do it.
            await self._send_pending()
        else:
            log.warning(
                "quota store unreachable: the release of a lease is kept until it answers",
                extra={"tenant_id": tenant_id},
            )
            self._pending.append(release)

    async def _send(self, release: _PendingRelease) -> bool:
        keys = [self.key(release.tenant_id, k) for k in ("tpm", "conc", "epoch")]
        args: list[float | str] = [
            self._window_ms,
            _limit(release.limits.tokens),
            release.refund,
            release.epoch or "",
        ]
        try:
            await self._release(keys=keys, args=args)
        except RedisError:
            return False
        return True

    async def _send_pending(self) -> None:
        # Taken out of the list before the first await, so that two callers never send one twice.
        pending, self._pending = self._pending, []
        for i, release in enumerate(pending):
            if not await self._send(release):
                self._pending[:0] = pending[i:]
                return

    async def close(self) -> None:
        await self._redis.aclose()
