"""A pool of upstream endpoints for one `backend: remote` model: which one takes the next call, and which
are out.

- Least outstanding requests: the endpoint with the fewest calls in flight takes the next one (ties go
  round-robin), never more than max_concurrency_per_endpoint at once; a call past that waits.
- A 429 parks the endpoint until its Retry-After has passed; it is not a fault.
- Faults (connection errors, timeouts, 5xx) count per endpoint. A refused connection, or EJECT_AFTER
  faults in a row, ejects it for a cool-down. Once the cool-down is over, one call probes it: success
  takes it back, failure ejects it again for twice as long (up to MAX_COOL_DOWN_S).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from core.errors import ModelUnavailable, Timeout, TooManyRequests
from observability.metrics import Metrics

EJECT_AFTER = 3
FIRST_COOL_DOWN_S = 1.0
MAX_COOL_DOWN_S = 10.0


@dataclass(eq=False)
class Endpoint:
    url: str
    in_flight: int = 0
    faults: int = 0  # in a row
    ejected_until: float | None = None  # monotonic time; None while it takes traffic
    cool_down_s: float = FIRST_COOL_DOWN_S
    probing: bool = False
    retry_at: float = 0.0  # monotonic time before which a 429 asked us not to call
    last_error: str | None = None
    order: int = field(default=0)

    def usable(self, now: float) -> bool:
        """Takes traffic now, or is due a probe that nobody is running yet."""
        return self.ejected_until is None or (now >= self.ejected_until and not self.probing)


class EndpointPool:
    def __init__(self, model_id: str, urls: list[str], max_concurrency: int, metrics: Metrics) -> None:
        self.model_id = model_id
        self.endpoints = [Endpoint(url.rstrip("/"), order=i) for i, url in enumerate(urls)]
        self.max_concurrency = max_concurrency
        self.metrics = metrics
        self._turn = itertools.count()
        self._changed: asyncio.Event | None = None
        for e in self.endpoints:
            metrics.upstream_up.labels(model_id, e.url).set(1)

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def unavailable_reason(self) -> str:
        return "; ".join(f"{e.url}: {e.last_error or 'ejected'}" for e in self.endpoints)

    async def acquire(self, avoid: set[Endpoint], deadline: float) -> Endpoint:
        """The endpoint for the next call, counted in flight until release(). Prefers endpoints not in
        `avoid` (already tried by this call). Raises ModelUnavailable when every endpoint is ejected,
        TooManyRequests when 429s park them all past the deadline, Timeout when capacity never frees."""
        while True:
            now = time.monotonic()
            usable = [e for e in self.endpoints if e.usable(now)]
            if not usable:
                raise ModelUnavailable(f"model {self.model_id!r}: every upstream endpoint is ejected ({self.unavailable_reason()})")
            ready = [e for e in usable if e.retry_at <= now and e.in_flight < self.max_concurrency]
            fresh = [e for e in ready if e not in avoid] or ready
            if fresh:
                turn = next(self._turn)
                n = len(self.endpoints)
                chosen = min(fresh, key=lambda e: (e.in_flight, (e.order - turn) % n))
                if chosen.ejected_until is not None:
                    chosen.probing = True
                chosen.in_flight += 1
                self.metrics.upstream_in_flight.labels(self.model_id, chosen.url).set(chosen.in_flight)
                return chosen
            parked = [e.retry_at for e in usable if e.retry_at > now]
            wake = min(parked) if parked else deadline
            if wake >= deadline:
                if parked and len(parked) == len(usable):
                    raise TooManyRequests(f"model {self.model_id!r}: the upstream is rate limiting", retry_after_s=wake - now)
                if now >= deadline:
                    raise Timeout(f"model {self.model_id!r}: no upstream endpoint had capacity in time")
            try:
                await asyncio.wait_for(self._event().wait(), timeout=max(0.0, min(wake, deadline) - now))
            except asyncio.TimeoutError:
                pass

    def release(self, e: Endpoint) -> None:
        e.in_flight -= 1
        self.metrics.upstream_in_flight.labels(self.model_id, e.url).set(e.in_flight)
        self._wake()

    def succeeded(self, e: Endpoint) -> None:
        e.faults = 0
        if e.ejected_until is not None:
            e.ejected_until, e.probing, e.cool_down_s = None, False, FIRST_COOL_DOWN_S
            self.metrics.upstream_up.labels(self.model_id, e.url).set(1)
            self._wake()

    def rate_limited(self, e: Endpoint, retry_after_s: float) -> None:
        e.retry_at = max(e.retry_at, time.monotonic() + retry_after_s)
        if e.probing:  # it answered: it is up
            self.succeeded(e)

    def faulted(self, e: Endpoint, reason: str, *, refused: bool = False) -> None:
        e.faults += 1
        e.last_error = reason
        if e.probing or refused or e.faults >= EJECT_AFTER:
            self._eject(e)

    def _eject(self, e: Endpoint) -> None:
        if e.ejected_until is not None and not e.probing and e.ejected_until > time.monotonic():
            return  # already out: calls that were in flight when it went down fail one after another
        if e.probing:
            e.cool_down_s = min(e.cool_down_s * 2, MAX_COOL_DOWN_S)
        e.probing = False
        e.ejected_until = time.monotonic() + e.cool_down_s
        self.metrics.upstream_ejections.labels(self.model_id, e.url).inc()
        self.metrics.upstream_up.labels(self.model_id, e.url).set(0)

    def describe(self) -> list[dict]:
        now = time.monotonic()
        return [
            {
                "url": e.url,
                "state": "up" if e.ejected_until is None else "probing" if e.probing else "ejected",
                "in_flight": e.in_flight,
                **({"ejected_for_s": round(e.ejected_until - now, 2)} if e.ejected_until and e.ejected_until > now else {}),
                **({"last_error": e.last_error} if e.last_error else {}),
            }
            for e in self.endpoints
        ]
