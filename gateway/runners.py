"""Model runners: what the service asks for scored results. A local runner is a loaded model's scheduler
and backend (tokenize here, score in the engine); a remote runner (gateway.remote.RemoteModel) is a pool
of upstream endpoints and has no tokenizer or device. Both answer one internal request with a RerankResult
cut to its top_n."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from backends.base import Prepared
from core.config import Effective, ModelSpec
from core.errors import BadRequest
from gateway.metrics import Metrics
from gateway.types import RerankRequest, RerankResult

if TYPE_CHECKING:
    from engine import Scheduler
    from gateway.service import Caller


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
        cap = self.max_chunks_per_request
        max_length = self.eff.max_length

        def check(part: Prepared, doc_base: int, chunks: int) -> None:
            # Runs on each slice as it is tokenized, before it is queued: a refusal stops the whole request.
            if chunks > cap:
                raise BadRequest(
                    f"invalid request: the documents split into at least {chunks} chunks; the maximum is {cap} "
                    "per request (server.max_chunks_per_request): lower max_chunks_per_doc or raise max_tokens_per_doc"
                )
            if not req.truncate and part.cut_docs:
                raise BadRequest(
                    f"invalid request: document {doc_base + part.cut_docs[0]} does not fit the model's {max_length} "
                    "tokens with the query, and truncation is off; shorten it or turn truncation on"
                )

        done, prepared = await self.scheduler.rerank(
            req.query,
            req.texts,
            tokenize=dict(
                max_length=max_length,
                max_chunks=req.max_chunks_per_doc or 1,
                instruction=req.instruction or self.spec.instruction,
                max_doc_tokens=req.max_tokens_per_doc,
            ),
            check=check,
            top_n=min(req.top_n or len(req.texts), len(req.texts)),
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
            scored_units=prepared.n_items,
            queue_s=done.queue_s,
            tokenize_s=done.tokenize_s,
            inference_s=done.inference_s,
        )
