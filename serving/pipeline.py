"""The rerank pipeline, the same whatever dialect a request came in:
access check -> tenant limits -> route -> model (its runner) -> usage ledger.

One RerankPipeline per app, built by the app's lifespan and handed to every rerank handler; a handler
turns its dialect's body into a RerankRequest, gives it with the RequestContext, and turns the answer back.
The pipeline serves one registry at a time (`Served`: the registry with its model pool and route table).
A reload switches it whole (serving.reload); a request keeps the one it started with.

Cancelling `rerank` (the HTTP edge does when the client goes away, or when the drain deadline passes)
drops the request's queued work in the engine and refunds its reserved quota; nothing is billed for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

from core.config import Registry, name_index
from core.errors import GatewayError, InferenceFailed, ModelUnavailable, ServiceUnavailable, TooManyRequests
from core.rerank import RerankRequest, RerankResult, max_scored_units, search_units
from observability.metrics import Metrics
from pool.model_pool import ModelPool
from serving.routing import Decision, RouteTable
from serving.shadow import ShadowRecorder
from tenancy import auth
from tenancy.caller import Caller
from tenancy.limits import Limiter, OverLimit
from tenancy.usage import UsageStore


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who asks, and how, from the request's headers (gateway.rerank_routes builds it)."""

    caller: Caller  # the authenticated tenant: its access, limits and usage
    queued_as: Caller  # whom the engine queues the work as: a front door's forwarded tenant, else the caller
    user: str | None = None  # X-User-Id: sticky splits by user when the body names none
    variant: str | None = None  # X-Rerank-Variant: a tester forcing one of a route's models


@dataclass(slots=True)
class Routed:
    """What the pipeline answers: the result (cut to the request's top_n), the route decision, and each
    model passed over before the answer with why."""

    result: RerankResult
    decision: Decision
    skipped: list[tuple[str, str]]

    def headers(self) -> dict[str, str]:
        result = self.result
        out = {
            # As TEI does: where the time went, in milliseconds.
            "x-queue-time": f"{result.queue_s * 1000:.2f}",
            "x-tokenize-time": f"{result.tokenize_s * 1000:.2f}",
            "x-inference-time": f"{result.inference_s * 1000:.2f}",
            "x-compute-tokens": str(result.total_tokens),
            "x-rerank-model": result.model,
            "x-rerank-route": self.decision.name,
        }
        if self.skipped:
            out["x-rerank-fallback"] = ", ".join(f"{m}={cause}" for m, cause in self.skipped)
        return out


class Served:
    """One registry as it is served: the registry, its model pool, its route table."""

    def __init__(self, registry: Registry, pool: ModelPool) -> None:
        self.registry = registry
        self.pool = pool
        self.routes = RouteTable(registry, name_index(registry))


class RerankPipeline:
    def __init__(self, served: Served, *, limiter: Limiter, usage: UsageStore, shadows: ShadowRecorder, metrics: Metrics) -> None:
        self.served = served
        self.limiter = limiter
        self.usage = usage
        self.shadows = shadows
        self.metrics = metrics

    @property
    def registry(self) -> Registry:
        return self.served.registry

    @property
    def pool(self) -> ModelPool:
        return self.served.pool

    @property
    def routes(self) -> RouteTable:
        return self.served.routes

    async def rerank(self, req: RerankRequest, ctx: RequestContext) -> Routed:
        served = self.served  # what this request runs on, whatever a reload switches meanwhile
        registry = served.registry
        auth.check_model_access(ctx.caller, req.model or registry.default_model, registry)
        tenant = registry.tenants.get(ctx.caller.tenant)
        try:
            # Quota is reserved for the most chunks the request can become (core.rerank.max_scored_units).
            async with self.limiter.hold(ctx.caller.tenant, tenant, search_units(max_scored_units(req))) as lease:
                routed = await self._routed(served, req, ctx)
                result = routed.result
                lease.used_units = search_units(result.scored_units)
                # Recorded before the answer leaves: what was acknowledged is in the ledger. A request whose row
                # could not be written fails unbilled, and its units are refunded. (One whose client went away
                # while its row was written is billed: the row is written all the same.)
                try:
                    await self.usage.record(
                        ctx.caller.tenant, result.model, documents=len(req.texts), search_units=lease.used_units, tokens=result.total_tokens
                    )
                except ServiceUnavailable:
                    lease.used_units = None
                    raise
        except OverLimit as exc:
            self.metrics.limited.labels(exc.tenant, exc.which).inc()
            raise
        return routed

    async def _routed(self, served: Served, req: RerankRequest, ctx: RequestContext) -> Routed:
        """Decide, try the candidates in order, mirror to the shadow after the answer, cut to top_n."""
        decision = served.routes.decide(
            req.model,
            tenant=ctx.queued_as.tenant,
            user=req.user or ctx.user,
            variant=ctx.variant,
            # A forced variant must be a model the caller may use by name.
            allowed=lambda model_id: auth.may_use(ctx.caller, model_id),
        )
        # The shadow comparison needs the primary's full ranking. It costs nothing extra: the engine scores
        # every document anyway and top-k over all of them is the same tensor, cut here instead.
        run = dataclasses.replace(req, top_n=None) if decision.shadow else req
        skipped: list[tuple[str, str]] = []
        result = None
        try:
            for i, model_id in enumerate(decision.candidates):
                last = i == len(decision.candidates) - 1
                if not last:
                    cause = served.pool.unready_cause(model_id)
                    if cause is not None:
                        skipped.append((model_id, cause))
                        continue
                try:
                    result = await self.score(served, run, model_id, ctx.queued_as)
                    break
                except (ModelUnavailable, TooManyRequests, InferenceFailed) as exc:
                    if last:
                        raise
                    skipped.append((model_id, _cause(exc)))
        except GatewayError as exc:
            exc.headers.setdefault("x-rerank-route", decision.name)
            raise
        finally:
            if decision.route is not None:
                for model_id, cause in skipped:
                    self.metrics.route_fallbacks.labels(decision.route, model_id, cause).inc()
        assert result is not None
        result.route = decision.name
        if decision.route is not None:
            self.metrics.route_requests.labels(decision.route, result.model).inc()
            self.shadows.answered(decision.route, result.model, skipped)
            if decision.shadow is not None and decision.shadow != result.model:
                self.shadows.mirror(
                    served.pool, decision.route, decision.shadow, req, result,
                    score=lambda shadow_req, caller: self.score(served, shadow_req, decision.shadow, caller),
                )
        if run is not req and req.top_n is not None:
            result = dataclasses.replace(result, indices=result.indices[: req.top_n], scores=result.scores[: req.top_n])
        return Routed(result=result, decision=decision, skipped=skipped)

    async def score(self, served: Served, req: RerankRequest, model_id: str, caller: Caller) -> RerankResult:
        """One model's answer, counted in the request metrics by status (499: the caller went away)."""
        started = time.perf_counter()
        status = "200"
        try:
            async with served.pool.runner(model_id) as runner:
                result = await runner.rerank(req, caller=caller, timeout_s=served.registry.server.request_timeout_s)
            self.metrics.search_units.labels(model_id, caller.tenant).inc(search_units(result.scored_units))
            self.metrics.documents.labels(model_id, caller.tenant).inc(len(req.texts))
            self.metrics.billed_tokens.labels(model_id, caller.tenant).inc(result.total_tokens)
            return result
        except GatewayError as exc:
            status = str(exc.status_code)
            raise
        except asyncio.CancelledError:
            status = "499"  # the client went away
            raise
        except Exception:
            status = "500"
            raise
        finally:
            self.metrics.requests.labels(model_id, status, caller.tenant).inc()
            self.metrics.request_seconds.labels(model_id).observe(time.perf_counter() - started)


def _cause(exc: GatewayError) -> str:
    if isinstance(exc, TooManyRequests):
        return "overloaded"
    if isinstance(exc, InferenceFailed):
        return "failed"
    return "unavailable"
