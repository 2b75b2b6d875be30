"""A local model's runner: what the serving pipeline asks for scored results. Tokenizes here (in the engine's
tokenizer lanes), queues the pairs in the model's Scheduler and answers with a RerankResult cut to the
request's top_n. One per loaded model, built by pool.local_loading and kept by the pool.

A remote model's runner (pool.remote_runner.RemoteRunner) answers the same calls with no tokenizer or
device of its own."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import numpy as np

from backends.base import Prepared
from core.config import Effective, LocalModelSpec, ModelSpec, ServerSettings
from core.errors import BadRequest
from core.rerank import RerankRequest, RerankResult
from engine import Scheduler
from observability.metrics import Metrics
from tenancy.caller import Caller


class LocalRunner:
    def __init__(
        self,
        model_id: str,
        spec: LocalModelSpec,
        eff: Effective,
        scheduler: Scheduler,
        metrics: Metrics,
        *,
        server: ServerSettings,
        weights_bytes: int = 0,
        warmup: dict[str, Any] | None = None,
        budget_reason: str | None = None,
        budget_ladder: list[dict[str, Any]] | None = None,
        load_seconds: float = 0.0,
    ) -> None:
        self.model_id = model_id
        self.spec = spec
        self.eff = eff
        self.scheduler = scheduler
        self.metrics = metrics
        self.max_chunks_per_request = server.max_chunks_per_request
        self.weights_bytes = weights_bytes
        self.warmup = warmup
        # Why the scheduler runs with its token budget, when the warm-up chose it (a profile-less GPU model),
        # and the ladder it was chosen from: each rung's max_batch_tokens, tokens_per_s, peak_bytes.
        self.budget_reason = budget_reason
        self.budget_ladder = budget_ladder
        self.load_seconds = load_seconds

    # -- what the pool asks ------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The model as /v1/models shows it once loaded: the precision and budget it really runs with."""
        out = {
            "profile": self.eff.profile,
            "device": self.eff.device,
            "dtype": str(self.scheduler.backend.dtype).removeprefix("torch."),
            "max_length": self.eff.max_length,
            "max_batch_tokens": self.scheduler.max_batch_tokens,
            "budget_reason": self.budget_reason or self.eff.budget_reason,
        }
        if self.budget_ladder is not None:
            out["budget_ladder"] = self.budget_ladder
        batch_time = self.scheduler.batch_time()
        if batch_time is not None:
            out["batch_time"] = batch_time
        runtime = self.scheduler.backend.runtime
        if runtime is not None:
            out["runtime"] = runtime.describe()
        return out

    def busy(self) -> bool:
        """More than one batch already waiting: the model has real work to do (a shadow request skips it)."""
        return self.scheduler.queue_depth()[0] > self.scheduler.max_batch_size

    def queue_depth(self) -> tuple[int, int] | None:
        """(pairs, tokens) waiting."""
        return self.scheduler.queue_depth()

    def reconfigure(self, spec: ModelSpec, server: ServerSettings) -> None:
        """A reload kept this model: take the new entry's instruction and the server's queue limits."""
        assert isinstance(spec, LocalModelSpec)
        self.spec = spec
        self.max_chunks_per_request = server.max_chunks_per_request
        self.scheduler.max_queue_pairs = server.max_queue_pairs
        self.scheduler.max_queue_tokens = server.max_queue_tokens

    def watch_health(self, on_change: Callable[[str | None], None]) -> None:
        """`on_change(reason)` from the engine's supervisor thread when an inference stream dies (a reason)
        or is back (None)."""
        self.scheduler.on_health = on_change

    async def close(self) -> None:
        # Joins the inference threads: off the event loop.
        await asyncio.to_thread(self.scheduler.close)

    # -- what the pipeline asks --------------------------------------------------------------------------
    async def rerank(self, req: RerankRequest, *, caller: Caller, timeout_s: float) -> RerankResult:
        """Tokenize, queue and wait for the scores. Cancelling the call drops the request's queued pairs."""
        cap = self.max_chunks_per_request
        max_length = self.eff.max_length

        def check(part: Prepared, docs: np.ndarray, chunks: int) -> None:
            # Runs on each slice as it is tokenized, before it is queued: a refusal stops the whole request.
            if chunks > cap:
                raise BadRequest(
                    f"invalid request: the documents split into at least {chunks} chunks; the maximum is {cap} "
                    "per request (server.max_chunks_per_request): lower max_chunks_per_doc or raise max_tokens_per_doc"
                )
            if not req.truncate and part.cut_docs:
                raise BadRequest(
                    f"invalid request: document {docs[part.cut_docs[0]]} does not fit the model's {max_length} "
                    "tokens with the query, and truncation is off; shorten it or turn truncation on"
                )

        done = await self.scheduler.rerank(
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
        )
        self.metrics.queue_seconds.labels(self.model_id).observe(done.queue_s)
        return RerankResult(
            model=self.model_id,
            indices=done.indices,
            scores=done.scores,
            total_tokens=done.tokens,
            scored_units=done.items,
            queue_s=done.queue_s,
            tokenize_s=done.tokenize_s,
            inference_s=done.inference_s,
        )
