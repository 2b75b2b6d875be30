"""The rerank pipeline, independent of any API dialect:
name -> model id -> the model's runner (local: tokenize, scheduler, top-k; remote: upstream calls) -> RerankResult."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable, Protocol

from core.config import Registry, name_index
from core.errors import GatewayError, InferenceFailed, ModelUnavailable, TooManyRequests
from tenancy.caller import Caller
from observability.metrics import Metrics
from pool.model_pool import ModelPool
from serving.routing import Routed, RouteTable
from core.rerank import RerankRequest, RerankResult, search_units


class RerankService:
    def __init__(self, registry: Registry, pool: ModelPool, metrics: Metrics) -> None:
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.names = name_index(registry)
        self.routes = RouteTable(registry, self.names)

    async def rerank(
        self,
        req: RerankRequest,
        model_id: str,
        *,
        caller: Caller = Caller(),
        disconnected: asyncio.Future | None = None,
    ) -> RerankResult:
        started = time.perf_counter()
        status = "200"
        try:
            async with self.pool.runner(model_id) as runner:
                result = await runner.rerank(
                    req, caller=caller, timeout_s=self.registry.server.request_timeout_s, disconnected=disconnected
                )
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


class ShadowSink(Protocol):
    """Where mirrored requests go (serving.shadow.ShadowRecorder); also counts who answered."""

    def answered(self, route: str, model_id: str, skipped: list[tuple[str, str]]) -> None: ...

    def mirror(self, service: RerankService, route: str, shadow_id: str, req: RerankRequest, primary: RerankResult) -> None: ...


async def rerank_routed(
    service: RerankService,
    sink: ShadowSink,
    req: RerankRequest,
    *,
    caller: Caller,
    user: str | None = None,
    variant: str | None = None,
    allowed: Callable[[str], bool] = lambda model_id: True,
    disconnected: asyncio.Future | None = None,
) -> Routed:
    """Decide, try the candidates in order, mirror to the shadow after the answer, cut to top_n."""
    decision = service.routes.decide(
        req.model, tenant=caller.tenant, user=req.user or user, variant=variant, allowed=allowed
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
                cause = service.pool.unready_cause(model_id)
                if cause is not None:
                    skipped.append((model_id, cause))
                    continue
            try:
                result = await service.rerank(run, model_id, caller=caller, disconnected=disconnected)
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
                service.metrics.route_fallbacks.labels(decision.route, model_id, cause).inc()
    assert result is not None
    result.route = decision.name
    if decision.route is not None:
        service.metrics.route_requests.labels(decision.route, result.model).inc()
        sink.answered(decision.route, result.model, skipped)
        if decision.shadow is not None and decision.shadow != result.model:
            sink.mirror(service, decision.route, decision.shadow, req, result)
    if run is not req and req.top_n is not None:
        result = dataclasses.replace(result, indices=result.indices[: req.top_n], scores=result.scores[: req.top_n])
    return Routed(result=result, decision=decision, skipped=skipped)


def _cause(exc: GatewayError) -> str:
    if isinstance(exc, TooManyRequests):
        return "overloaded"
    if isinstance(exc, InferenceFailed):
        return "failed"
    return "unavailable"
