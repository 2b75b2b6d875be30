"""The rerank pipeline, independent of any API dialect:
name -> model id -> tokenize -> per-model scheduler -> top-k -> RerankResult."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from core.config import Registry, name_index
from core.errors import BadRequest, GatewayError
from gateway.metrics import Metrics
from gateway.models import ModelPool
from gateway.routing import RouteTable
from gateway.types import RerankRequest, RerankResult, search_units


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the tenant name ("" when the gateway runs open), its fair-share weight, and the
    model names (ids, aliases, routes) it may use; None means all."""

    tenant: str = ""
    weight: float = 1.0
    models: frozenset[str] | None = None


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
        entry = self.pool.entries[model_id]
        entry.active += 1
        try:
            scheduler = await self.pool.scheduler(model_id)
            eff = self.pool.entries[model_id].eff
            spec = self.pool.entries[model_id].spec
            tokenize_start = time.perf_counter()
            prepared = await scheduler.prepare(
                req.query,
                req.texts,
                max_length=eff.max_length,
                max_chunks=req.max_chunks_per_doc or 1,
                instruction=req.instruction or spec.instruction,
                max_doc_tokens=req.max_tokens_per_doc,
            )
            tokenize_s = time.perf_counter() - tokenize_start
            cap = self.registry.server.max_chunks_per_request
            if len(prepared.items) > cap:
                raise BadRequest(
                    f"invalid request: the documents split into {len(prepared.items)} chunks; the maximum is {cap} "
                    "per request (server.max_chunks_per_request): lower max_chunks_per_doc or raise max_tokens_per_doc"
                )
            top_n = min(req.top_n or len(req.texts), len(req.texts))
            done = await scheduler.submit(
                prepared,
                top_n=top_n,
                raw_scores=req.raw_scores,
                tenant=caller.tenant,
                weight=caller.weight,
                priority=req.priority,
                timeout_s=self.registry.server.request_timeout_s,
                disconnected=disconnected,
            )
            self.metrics.queue_seconds.labels(model_id).observe(done.queue_s)
            self.metrics.search_units.labels(model_id, caller.tenant).inc(search_units(len(prepared.items)))
            self.metrics.documents.labels(model_id, caller.tenant).inc(len(req.texts))
            self.metrics.billed_tokens.labels(model_id, caller.tenant).inc(prepared.tokens)
            return RerankResult(
                model=model_id,
                indices=done.indices,
                scores=done.scores,
                total_tokens=prepared.tokens,
                scored_units=len(prepared.items),
                queue_s=done.queue_s,
                tokenize_s=tokenize_s,
                inference_s=done.inference_s,
            )
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
            entry.active -= 1
            self.metrics.requests.labels(model_id, status, caller.tenant).inc()
            self.metrics.request_seconds.labels(model_id).observe(time.perf_counter() - started)
