"""The rerank pipeline, independent of any API dialect:
name -> model id -> the model's runner (local: tokenize, scheduler, top-k; remote: upstream calls) -> RerankResult."""

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
            runner = await self.pool.runner(model_id)
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
            entry.active -= 1
            self.metrics.requests.labels(model_id, status, caller.tenant).inc()
            self.metrics.request_seconds.labels(model_id).observe(time.perf_counter() - started)
