"""The in-process limiter's windows and accounting, on an injected clock (HTTP tests use real time)."""

from __future__ import annotations

import asyncio

import pytest

from core.config import LimitsConfig, Tenant
from tenancy.limits import MemoryLimiter, OverLimit


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spec(**limits) -> Tenant:
    return Tenant(api_key_sha256="a" * 64, **limits)


def run(coro):
    return asyncio.run(coro)


def test_requests_per_minute_fixed_window():
    clock = Clock(60.0 * 16_666 + 20)  # 20 s into a minute
    limiter = MemoryLimiter(LimitsConfig(), clock=clock)
    t = spec(requests_per_minute=2)

    async def go():
        for _ in range(2):
            await limiter.release(await limiter.acquire("a", t, 1))
        with pytest.raises(OverLimit) as exc:
            await limiter.acquire("a", t, 1)
        assert exc.value.retry_after_s == pytest.approx(40.0)
        assert exc.value.headers["Retry-After"] == "40"
        clock.now += 39.9
        with pytest.raises(OverLimit):
            await limiter.acquire("a", t, 1)
        clock.now += 0.2  # the next minute
        await limiter.acquire("a", t, 1)
        # Tenants have separate budgets.
        await limiter.acquire("b", t, 1)

    run(go())


def test_search_units_reserved_then_settled_or_refunded():
    clock = Clock(86_400.0 * 100 + 3600)  # 01:00 UTC
    limiter = MemoryLimiter(LimitsConfig(), clock=clock)
    t = spec(search_units_per_day=10)

    async def go():
        lease = await limiter.acquire("a", t, 4)
        lease.used_units = 6  # chunks made it more than the estimate
        await limiter.release(lease)
        failed = await limiter.acquire("a", t, 4)  # used 6 + 4 reserved
        await limiter.release(failed)  # used_units None: refunded
        with pytest.raises(OverLimit) as exc:
            await limiter.acquire("a", t, 5)  # 6 + 5 > 10
        assert exc.value.which == "quota"
        assert exc.value.retry_after_s == pytest.approx(23 * 3600)  # until UTC midnight
        await limiter.acquire("a", t, 4)  # exactly 10
        clock.now += 23 * 3600
        await limiter.acquire("a", t, 10)

    run(go())


def test_concurrency_slots_are_returned():
    limiter = MemoryLimiter(LimitsConfig(), clock=Clock(0.0))
    t = spec(max_concurrent_requests=2)

    async def go():
        first = await limiter.acquire("a", t, 1)
        await limiter.acquire("a", t, 1)
        with pytest.raises(OverLimit) as exc:
            await limiter.acquire("a", t, 1)
        assert exc.value.which == "concurrency"
        await limiter.release(first)
        await limiter.acquire("a", t, 1)

    run(go())


def test_hold_releases_on_error_and_a_refusal_charges_nothing():
    limiter = MemoryLimiter(LimitsConfig(), clock=Clock(30.0))
    t = spec(requests_per_minute=2, max_concurrent_requests=1, search_units_per_day=5)

    async def go():
        with pytest.raises(RuntimeError):
            async with limiter.hold("a", t, 5):
                raise RuntimeError("the model failed")
        # The failed request gave back its slot and its 5 units, but it did count as a request.
        async with limiter.hold("a", t, 5) as lease:
            lease.used_units = 5
        with pytest.raises(OverLimit) as exc:
            async with limiter.hold("a", t, 1):
                pass
        assert exc.value.which == "rate"
        # No limits configured: nothing is counted at all.
        for _ in range(100):
            async with limiter.hold("b", spec(), 1000):
                pass

    run(go())
