"""Model runners: what the service asks for scored results. A local runner is a loaded model's scheduler
and backend (tokenize here, score in the engine); a remote runner (pool.remote_runner.RemoteModel) is a pool
of upstream endpoints and has no tokenizer or device. Both answer one internal request with a RerankResult
cut to its top_n."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from core.config import Effective, ModelSpec
from core.errors import BadRequest
from engine import Scheduler
from tenancy.caller import Caller
from observability.metrics import Metrics
from core.rerank import RerankRequest, RerankResult


class Runner(Protocol):
    async def rerank(
        self, req: RerankRequest, *, caller: Caller, timeout_s: float, disconnected: asyncio.Future | None = None
    ) -> RerankResult: ...


class LocalRunner:
    def __init__(
        self, model_id: str, spec: ModelSpec, eff: Effective, scheduler: Scheduler, metrics: Metrics, *, max_chunks_per_request: int
    ) -> None:
        self.model_id = model_id
        self.max_chunks_per_request = max_chunks_per_request
        self.spec = spec
        self.eff = eff
        self.scheduler = scheduler
        self.metrics = metrics

    async def rerank(
        self, req: RerankRequest, *, caller: Caller, timeout_s: float, disconnected: asyncio.Future | None = None
    ) -> RerankResult:
        tokenize_start = time.perf_counter()
        prepared = await self.scheduler.prepare(
            req.query,
            req.texts,
            max_length=self.eff.max_length,
            max_chunks=req.max_chunks_per_doc or 1,
            instruction=req.instruction or self.spec.instruction,
            max_doc_tokens=req.max_tokens_per_doc,
        )
        tokenize_s = time.perf_counter() - tokenize_start
        cap = self.max_chunks_per_request
        if len(prepared.items) > cap:
            raise BadRequest(
                f"invalid request: the documents split into {len(prepared.items)} chunks; the maximum is {cap} "
                "per request (server.max_chunks_per_request): lower max_chunks_per_doc or raise max_tokens_per_doc"
            )
        if not req.truncate and prepared.cut_docs:
            raise BadRequest(
                f"invalid request: document {prepared.cut_docs[0]} does not fit the model's {self.eff.max_length} "
                "tokens with the query, and truncation is off; shorten it or turn truncation on"
            )
        top_n = min(req.top_n or len(req.texts), len(req.texts))
        done = await self.scheduler.submit(
            prepared,
            top_n=top_n,
            raw_scores=req.raw_scores,
            tenant=caller.tenant,
            weight=caller.weight,
            priority=req.priority,
            timeout_s=timeout_s,
            disconnected=disconnected,
        )
        self.metrics.queue_seconds.labels(self.model_id).observe(done.queue_s)
        return RerankResult(
            model=self.model_id,
            indices=done.indices,
            scores=done.scores,
            total_tokens=prepared.tokens,
            scored_units=len(prepared.items),
            queue_s=done.queue_s,
            tokenize_s=tokenize_s,
            inference_s=done.inference_s,
        )
