"""`backend: remote`: a model answered by another rerank service (hosted or self-hosted), through a pool of
endpoints that speak one dialect (dialects.upstream). A runner like pool.local_runner.LocalRunner: the
pipeline asks it for a RerankResult and never sees HTTP.

A request larger than the upstream takes is split into calls of max_documents_per_call, sent at once
and merged (each call asks for the request's top_n: the merged top_n is always within the union). A
failed call is retried with backoff, on another endpoint when there is one: connection errors, timeouts,
5xx and 429 (after its Retry-After). Other 4xx are the request's fault and are not retried. A client that
goes away cancels the calls in flight, which closes their connections, so the upstream drops them too.
The API key comes from the environment variable named in the registry and goes nowhere but the header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Callable

import httpx
import msgspec

from core.config import ModelSpec, RemoteModelSpec, ServerSettings
from core.errors import (
    BadRequest, GatewayError, InferenceFailed, ModelUnavailable, Timeout, TooManyRequests,
)
from core.rerank import RerankRequest, RerankResult, Scored
from dialects.upstream import DIALECTS, TENANT_HEADER, TENANT_WEIGHT_HEADER
from observability.logs import outbound_headers
from observability.metrics import Metrics
from pool.upstream_endpoints import Endpoint, EndpointPool
from tenancy.caller import Caller

log = logging.getLogger("rerank_gateway.remote")
# httpx logs every call at INFO: one line per upstream call costs the front door about a millisecond of
# CPU per request (measured, bench/remote_hop.py), and rerank_upstream_* metrics already count them.
logging.getLogger("httpx").setLevel(logging.WARNING)

MAX_ATTEMPTS = 4
BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
# A 429 without Retry-After waits this long before the endpoint is called again.
DEFAULT_RETRY_AFTER_S = 1.0
PROBE_TIMEOUT_S = 5.0


class _Retry(Exception):
    """One call failed in a way another attempt may fix; carries the error to raise if none does."""

    def __init__(self, error: GatewayError) -> None:
        self.error = error


class RemoteRunner:
    def __init__(self, model_id: str, spec: RemoteModelSpec, metrics: Metrics, api_key: str | None) -> None:
        self.model_id = model_id
        self.dialect = DIALECTS[spec.dialect]
        self.upstream_model = spec.upstream_model or model_id
        self.max_per_call = spec.max_documents_per_call or self.dialect.max_documents_per_call
        self.timeout_s = spec.timeout_s
        self.metrics = metrics
        self.pool = EndpointPool(model_id, spec.endpoints, spec.max_concurrency_per_endpoint, metrics)
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._limits = httpx.Limits(
            max_connections=len(spec.endpoints) * spec.max_concurrency_per_endpoint,
            max_keepalive_connections=len(spec.endpoints) * spec.max_concurrency_per_endpoint,
        )
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def open(cls, model_id: str, spec: RemoteModelSpec, metrics: Metrics) -> RemoteRunner:
        """Build the model at load time (in a worker thread). Raises with the reason the model is
        unavailable: no key in the environment, or no endpoint answering at all."""
        key = None
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env, "").strip()
            if not key:
                raise RuntimeError(f"environment variable {spec.api_key_env} (the upstream API key) is not set")
        model = cls(model_id, spec, metrics, key)
        failures = []
        for endpoint in model.pool.endpoints:
            try:
                # Any HTTP answer, even a 404, says the endpoint is there.
                httpx.get(endpoint.url, timeout=min(PROBE_TIMEOUT_S, spec.timeout_s))
            except httpx.HTTPError as exc:
                endpoint.last_error = f"{type(exc).__name__}: {exc}"[:200]
                failures.append(endpoint)
        if len(failures) == len(model.pool.endpoints):
            raise RuntimeError(f"no upstream endpoint reachable: {model.pool.unavailable_reason()}")
        for endpoint in failures:
            model.pool.faulted(endpoint, endpoint.last_error or "unreachable", refused=True)
        return model

    # -- what the model pool asks -------------------------------------------------------------------------
    def describe(self) -> dict:
        """A remote model has no device, precision or batching here: its upstream has them."""
        return {"upstream": {"dialect": self.dialect.name, "model": self.upstream_model, "endpoints": self.pool.describe()}}

    def busy(self) -> bool:
        return False  # no queue here; a shadow request is bounded by the recorder's in-flight cap

    def queue_depth(self) -> tuple[int, int] | None:
        return None

    def reconfigure(self, spec: ModelSpec, server: ServerSettings) -> None:
        """A reload kept this model (only its aliases or load switch changed): nothing to take."""

    def watch_health(self, on_change: Callable[[str | None], None]) -> None:
        """Endpoints fail and recover one by one (upstream_endpoints); the model stays ready."""

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(limits=self._limits, headers=self._headers, follow_redirects=False)
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- the runner interface ------------------------------------------------------------------------------
    async def rerank(self, req: RerankRequest, *, caller: Caller, timeout_s: float) -> RerankResult:
        """Calls of at most max_documents_per_call at once, merged. Cancelling this cancels the calls in
        flight, which closes their connections, so the upstream drops them too."""
        if req.raw_scores and not self.dialect.raw_scores:
            raise BadRequest(f"invalid request: model {self.model_id!r} ({self.dialect.name} upstream) cannot return raw scores")
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        n = len(req.texts)
        top_n = min(req.top_n or n, n)
        starts = range(0, n, self.max_per_call)
        # A rerank-gateway upstream queues each of our tenants fairly when it trusts us to say which.
        forward = {TENANT_HEADER: caller.tenant, TENANT_WEIGHT_HEADER: f"{caller.weight:g}"}
        headers = forward if self.dialect.forwards_tenant and caller.tenant else {}
        calls = [
            asyncio.ensure_future(self._call(req, req.texts[s : s + self.max_per_call], top_n if req.top_n else None, deadline, headers))
            for s in starts
        ]
        every = asyncio.gather(*calls)
        try:
            done, _ = await asyncio.wait({every}, timeout=max(0.0, deadline - time.monotonic()))
            if every not in done:
                raise Timeout(f"model {self.model_id!r}: the upstream did not answer within {timeout_s:g} s")
            answers: list[Scored] = every.result()
        finally:
            for call in calls:
                call.cancel()
            every.cancel()
            await asyncio.gather(every, return_exceptions=True)
        merged = [(score, s + i) for s, answer in zip(starts, answers) for i, score in zip(answer.indices, answer.scores)]
        merged.sort(key=lambda pair: (-pair[0], pair[1]))
        merged = merged[:top_n]
        tokens = [a.tokens for a in answers if a.tokens is not None]
        return RerankResult(
            model=self.model_id,
            indices=[i for _, i in merged],
            scores=[s for s, _ in merged],
            total_tokens=sum(tokens),
            scored_units=n,
            inference_s=time.perf_counter() - started,
        )

    # -- one call, with its retries ------------------------------------------------------------------------
    async def _call(
        self, req: RerankRequest, texts: list[str], top_n: int | None, deadline: float, headers: dict[str, str]
    ) -> Scored:
        body = msgspec.json.encode(self.dialect.body(req, texts, self.upstream_model, top_n))
        tried: set[Endpoint] = set()
        error: GatewayError | None = None
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                pause = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                if time.monotonic() + pause >= deadline:
                    break
                await asyncio.sleep(pause)
            try:
                endpoint = await self.pool.acquire(tried, deadline)
            except ModelUnavailable as exc:
                # Every endpoint is out. The pool's message names each one's last error, this call's
                # failures included, so the answer is the same whether the call found them ejected or
                # probed them (a cool-down just over) and failed. An upstream's 5xx, timeout or malformed
                # answer says more than "unreachable" does, and is kept.
                raise (error if error is not None and not isinstance(error, ModelUnavailable) else exc) from None
            except (TooManyRequests, Timeout) as exc:
                raise exc from None
            tried.add(endpoint)
            try:
                return await self._send(endpoint, body, headers, len(texts), top_n, deadline)
            except _Retry as retry:
                error = retry.error
            finally:
                self.pool.release(endpoint)
        raise error or Timeout(f"model {self.model_id!r}: no upstream answer in time")

    async def _send(
        self, endpoint: Endpoint, body: bytes, headers: dict[str, str], n: int, top_n: int | None, deadline: float
    ) -> Scored:
        labels = (self.model_id, endpoint.url)
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            timeout = max(0.001, min(self.timeout_s, deadline - time.monotonic()))
            try:
                # The request id goes along, so a worker's log lines join the front door's.
                response = await self._http().post(
                    endpoint.url + self.dialect.path,
                    content=body,
                    headers={"content-type": "application/json", **outbound_headers(), **headers},
                    timeout=timeout,
                )
            except httpx.ConnectError as exc:
                outcome = "connect_error"
                self.pool.faulted(endpoint, f"ConnectError: {exc}"[:200], refused=True)
                raise _Retry(ModelUnavailable(f"model {self.model_id!r}: upstream {endpoint.url} unreachable")) from None
            except httpx.TimeoutException as exc:
                outcome = "timeout"
                self.pool.faulted(endpoint, f"{type(exc).__name__}")
                raise _Retry(Timeout(f"model {self.model_id!r}: upstream {endpoint.url} timed out")) from None
            except httpx.TransportError as exc:
                outcome = "transport_error"
                self.pool.faulted(endpoint, f"{type(exc).__name__}: {exc}"[:200])
                raise _Retry(InferenceFailed(f"model {self.model_id!r}: upstream {endpoint.url} failed: {type(exc).__name__}")) from None
            status = response.status_code
            if status == 200:
                try:
                    scored = self.dialect.answer(response.content, response.headers)
                    _check(scored, n, top_n)
                except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                    outcome = "bad_response"
                    self.pool.faulted(endpoint, f"bad response: {exc}"[:200])
                    raise _Retry(InferenceFailed(f"model {self.model_id!r}: upstream {endpoint.url} answered a malformed body")) from None
                outcome = "ok"
                self.pool.succeeded(endpoint)
                return scored
            message = self._error_message(response)
            if status == 429:
                outcome = "http_429"
                retry_after = _retry_after(response.headers.get("retry-after"))
                self.pool.rate_limited(endpoint, retry_after)
                raise _Retry(TooManyRequests(f"model {self.model_id!r}: upstream rate limited: {message}", retry_after_s=retry_after))
            if status >= 500:
                outcome = "http_5xx"
                self.pool.faulted(endpoint, f"HTTP {status}: {message}"[:200])
                raise _Retry(InferenceFailed(f"model {self.model_id!r}: upstream answered {status}: {message}"))
            outcome = "http_4xx"
            self.pool.succeeded(endpoint)  # it is up; the request is what it refused
            if status in (401, 403, 404):
                raise ModelUnavailable(f"model {self.model_id!r}: upstream refused ({status}): {message}")
            raise BadRequest(f"invalid request: the upstream of model {self.model_id!r} refused it ({status}): {message}")
        finally:
            self.metrics.upstream_requests.labels(*labels, outcome).inc()
            self.metrics.upstream_seconds.labels(*labels).observe(time.perf_counter() - started)

    def _error_message(self, response: httpx.Response) -> str:
        try:
            return self.dialect.error(response.content)[:500]
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
            return response.text[:200] or response.reason_phrase


def _check(scored: Scored, n: int, top_n: int | None) -> None:
    """An answer must rank distinct documents of this call, no more than asked for."""
    if len(scored.indices) != len(scored.scores) or len(set(scored.indices)) != len(scored.indices):
        raise ValueError("indices and scores do not pair up")
    if any(not 0 <= i < n for i in scored.indices):
        raise ValueError(f"an index outside 0..{n - 1}")
    if len(scored.indices) < min(top_n or n, n):
        raise ValueError(f"{len(scored.indices)} results for {min(top_n or n, n)} asked")


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else DEFAULT_RETRY_AFTER_S
    except ValueError:
        return DEFAULT_RETRY_AFTER_S  # an HTTP date: rare for rate limits; wait the default
