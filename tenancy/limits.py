"""Per-tenant limits: requests per minute, search units per day, concurrent requests.

Two stores behind one interface: `MemoryLimiter` (one process) and `RedisLimiter` (N replicas share one
budget). Both count in fixed windows aligned to the epoch, so "per day" is a UTC day, and both admit a
request only when every limit has room, charging all of them at once (a refused request costs nothing).

Search units are reserved before the request runs from what is known then (one unit per 100 documents)
and settled afterwards with the real count (chunks count), so a failed request is refunded.

When Redis cannot be reached the limiter follows `limits.on_failure`: "open" serves without limits,
"closed" refuses with 503. Either way it logs the change and `status()` reports it (shown by /ready);
it retries Redis at most once a second until it answers again.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable
from urllib.parse import urlsplit

from core.config import LimitsConfig, ServerSettings, Tenant
from core.errors import ServiceUnavailable, TooManyRequests

log = logging.getLogger("rerank_gateway.limits")

# After Redis fails, requests skip it (applying the failure policy) for this long before trying again.
REDIS_RETRY_S = 1.0
REDIS_TIMEOUT_S = 0.5


@dataclass(slots=True)
class Lease:
    """What one admitted request holds: a concurrency slot and reserved search units."""

    tenant: str
    slot: str | None = None  # concurrency slot id, when the tenant has a concurrency limit
    reserved_units: int = 0
    quota_window: int | None = None  # the window the units were charged to
    # Set by the caller once the request has run; None means it failed and its reservation is refunded.
    used_units: int | None = None


def _has_limits(spec: Tenant | None) -> bool:
    return spec is not None and any(
        v is not None for v in (spec.requests_per_minute, spec.search_units_per_day, spec.max_concurrent_requests)
    )


class OverLimit(TooManyRequests):
    """429 from a tenant limit (as opposed to a model's queue being full)."""

    def __init__(self, which: str, tenant: str, limit: int, retry_after_s: float) -> None:
        what = {
            "concurrency": f"{limit} concurrent requests",
            "rate": f"{limit} requests per minute",
            "quota": f"{limit} search units per day",
        }[which]
        super().__init__(f"tenant {tenant!r} is over its limit of {what}; retry later", retry_after_s=retry_after_s)
        self.which = which
        self.tenant = tenant




class Limiter(abc.ABC):
    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        # Requests inside hold(): a limiter a reload replaced is closed once this drops to zero.
        self.held = 0

    @asynccontextmanager
    async def hold(self, tenant: str, spec: Tenant | None, units: int) -> AsyncIterator[Lease]:
        """Admit a request for its whole run (429 when over a limit). Set `lease.used_units` when it
        succeeds; otherwise its reserved units are refunded on the way out."""
        if not _has_limits(spec):
            yield Lease(tenant)
            return
        self.held += 1
        try:
            lease = await self.acquire(tenant, spec, units)
            try:
                yield lease
            finally:
                await asyncio.shield(self.release(lease))
        finally:
            self.held -= 1

    def takes(self, config: LimitsConfig) -> bool:
        """Whether this limiter can run with `config` in place (a reload changed `limits:`); when not, the
        reload builds a new one. Counts live on: windows of another length start afresh."""
        return config.backend == self.config.backend and config.url == self.config.url

    def reconfigure(self, config: LimitsConfig, *, lease_ttl_s: float) -> None:
        self.config = config

    @abc.abstractmethod
    async def acquire(self, tenant: str, spec: Tenant, units: int) -> Lease:
        """Charge one request and `units` search units, and take a concurrency slot, or raise 429."""

    @abc.abstractmethod
    async def release(self, lease: Lease) -> None:
        """Give back the slot and settle the units (refund when `used_units` is None)."""

    async def status(self) -> str:
        return "ok"

    async def close(self) -> None:
        pass


class MemoryLimiter(Limiter):
    """Limits within this process. `clock` (epoch seconds) is injectable for unit tests of the windows."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.time) -> None:
        super().__init__(config)
        self.clock = clock
        self._requests: dict[str, tuple[int, int]] = {}  # tenant -> (window, count)
        self._units: dict[str, tuple[int, int]] = {}
        self._active: dict[str, int] = {}

    async def acquire(self, tenant: str, spec: Tenant, units: int) -> Lease:
        now = self.clock()
        rate_w = self.config.rate_window_s
        quota_w = self.config.quota_window_s
        rate_window, quota_window = math.floor(now / rate_w), math.floor(now / quota_w)
        requests = self._count(self._requests, tenant, rate_window)
        used = self._count(self._units, tenant, quota_window)
        active = self._active.get(tenant, 0)
        if spec.max_concurrent_requests is not None and active >= spec.max_concurrent_requests:
            raise OverLimit("concurrency", tenant, spec.max_concurrent_requests, 1.0)
        if spec.requests_per_minute is not None and requests + 1 > spec.requests_per_minute:
            raise OverLimit("rate", tenant, spec.requests_per_minute, (rate_window + 1) * rate_w - now)
        if spec.search_units_per_day is not None and used + units > spec.search_units_per_day:
            raise OverLimit("quota", tenant, spec.search_units_per_day, (quota_window + 1) * quota_w - now)
        self._requests[tenant] = (rate_window, requests + 1)
        self._units[tenant] = (quota_window, used + units)
        lease = Lease(tenant, reserved_units=units, quota_window=quota_window)
        if spec.max_concurrent_requests is not None:
            self._active[tenant] = active + 1
            lease.slot = "local"
        return lease

    async def release(self, lease: Lease) -> None:
        if lease.slot is not None:
            self._active[lease.tenant] = max(0, self._active.get(lease.tenant, 0) - 1)
        delta = (lease.used_units or 0) - lease.reserved_units
        window, used = self._units.get(lease.tenant, (None, 0))
        if delta and window == lease.quota_window:
            self._units[lease.tenant] = (window, max(0, used + delta))

    @staticmethod
    def _count(table: dict[str, tuple[int, int]], tenant: str, window: int) -> int:
        stored_window, count = table.get(tenant, (window, 0))
        return count if stored_window == window else 0


# One round trip admits or refuses atomically; Redis's own clock defines the windows, so replicas with
# skewed clocks still agree. Concurrency slots are a sorted set scored by expiry: a replica that dies
# holding slots frees them after the lease TTL.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local p = KEYS[1]
local rpm, rate_w = tonumber(ARGV[1]), tonumber(ARGV[2])
local units_limit, units, quota_w = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local conc, slot, ttl = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local ck = p .. ':active'
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
  if redis.call('ZCARD', ck) >= conc then return {1, '1'} end
end
local rw = math.floor(now / rate_w)
local rk = p .. ':req:' .. rw
if rpm >= 0 and tonumber(redis.call('GET', rk) or '0') + 1 > rpm then
  return {2, tostring((rw + 1) * rate_w - now)}
end
local qw = math.floor(now / quota_w)
local qk = p .. ':units:' .. qw
if units_limit >= 0 and tonumber(redis.call('GET', qk) or '0') + units > units_limit then
  return {3, tostring((qw + 1) * quota_w - now)}
end
if conc >= 0 then
  redis.call('ZADD', ck, now + ttl, slot)
  redis.call('PEXPIRE', ck, math.ceil(ttl * 1000))
end
if rpm >= 0 then
  redis.call('INCR', rk)
  redis.call('PEXPIRE', rk, math.ceil(rate_w * 1000) + 1000)
end
if units_limit >= 0 then
  redis.call('INCRBY', qk, units)
  redis.call('PEXPIRE', qk, math.ceil(quota_w * 1000) + 1000)
end
return {0, tostring(qw)}
"""

_RELEASE = """
local p = KEYS[1]
if ARGV[1] ~= '' then redis.call('ZREM', p .. ':active', ARGV[1]) end
local delta = tonumber(ARGV[3])
if ARGV[2] ~= '' and delta ~= 0 then
  local qk = p .. ':units:' .. ARGV[2]
  if redis.call('EXISTS', qk) == 1 then redis.call('INCRBY', qk, delta) end
end
return 0
"""

_REFUSAL = {1: "concurrency", 2: "rate", 3: "quota"}


class RedisLimiter(Limiter):
    """Limits shared by every replica that points at the same Redis."""

    def __init__(self, config: LimitsConfig, *, lease_ttl_s: float, prefix: str = "rerank-gateway") -> None:
        super().__init__(config)
        import redis.asyncio as aioredis

        assert config.url
        self.client = aioredis.Redis.from_url(
            config.url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._admit = self.client.register_script(_ADMIT)
        self._release = self.client.register_script(_RELEASE)
        self.lease_ttl_s = lease_ttl_s
        self.prefix = prefix
        # The URL may carry a password; messages name only the host.
        parts = urlsplit(config.url)
        self.where = f"redis at {parts.hostname}:{parts.port or 6379}"
        self.degraded: str | None = None
        self._retry_at = 0.0

    def reconfigure(self, config: LimitsConfig, *, lease_ttl_s: float) -> None:
        super().reconfigure(config, lease_ttl_s=lease_ttl_s)
        self.lease_ttl_s = lease_ttl_s

    def _key(self, tenant: str) -> str:
        # The hash tag keeps one tenant's keys in one slot, should the store be a Redis Cluster.
        return f"{self.prefix}:{{{tenant}}}"

    async def acquire(self, tenant: str, spec: Tenant, units: int) -> Lease:
        if self.degraded and time.monotonic() < self._retry_at:
            return self._unlimited(tenant)
        slot = uuid.uuid4().hex if spec.max_concurrent_requests is not None else None
        args = [
            -1 if spec.requests_per_minute is None else spec.requests_per_minute,
            self.config.rate_window_s,
            -1 if spec.search_units_per_day is None else spec.search_units_per_day,
            units,
            self.config.quota_window_s,
            -1 if spec.max_concurrent_requests is None else spec.max_concurrent_requests,
            slot or "",
            self.lease_ttl_s,
        ]
        try:
            code, value = await self._admit(keys=[self._key(tenant)], args=args)
        except Exception as exc:  # noqa: BLE001 - any store failure falls back to the configured policy
            self._failed(exc)
            return self._unlimited(tenant)
        self._recovered()
        code = int(code)
        if code:
            limit = {1: spec.max_concurrent_requests, 2: spec.requests_per_minute, 3: spec.search_units_per_day}[code]
            raise OverLimit(_REFUSAL[code], tenant, limit or 0, float(value))
        return Lease(tenant, slot=slot, reserved_units=units, quota_window=int(float(value)))

    async def release(self, lease: Lease) -> None:
        if lease.slot is None and lease.quota_window is None:
            return  # admitted while Redis was down: nothing was charged
        delta = (lease.used_units or 0) - lease.reserved_units
        args = [lease.slot or "", "" if lease.quota_window is None else lease.quota_window, delta]
        try:
            await self._release(keys=[self._key(lease.tenant)], args=args)
        except Exception as exc:  # noqa: BLE001 - the slot expires by its TTL; the unit delta is lost
            self._failed(exc)

    async def status(self) -> str:
        try:
            await self.client.ping()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
        else:
            self._recovered()
        return f"degraded: {self.degraded}" if self.degraded else "ok"

    async def close(self) -> None:
        await self.client.aclose()

    def _unlimited(self, tenant: str) -> Lease:
        if self.config.on_failure == "closed":
            raise ServiceUnavailable(f"rate limits cannot be checked ({self.where} unreachable); retry later", retry_after_s=REDIS_RETRY_S)
        return Lease(tenant)

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + REDIS_RETRY_S
        if self.degraded is None:
            policy = "serving without limits (on_failure: open)" if self.config.on_failure == "open" else "refusing tenant requests (on_failure: closed)"
            self.degraded = f"{self.where} unreachable ({type(exc).__name__}); {policy}"
            log.error("limits store failed: %s", self.degraded)

    def _recovered(self) -> None:
        if self.degraded is not None:
            log.warning("limits store recovered: %s answers again", self.where)
            self.degraded = None


def lease_ttl_s(server: ServerSettings) -> float:
    """How long a concurrency slot lives in Redis: past any request's timeout, so only a replica that died
    holding it leaves it to expire."""
    return server.request_timeout_s + 30


def build_limiter(config: LimitsConfig, *, lease_ttl_s: float) -> Limiter:
    if config.backend == "redis":
        return RedisLimiter(config, lease_ttl_s=lease_ttl_s)
    return MemoryLimiter(config)
