"""One batch, end to end, inside the failure boundary: collate, forward (with the OOM policy), the device
sync, scatter, pooling and top-k, metrics. Any error fails the requests of that batch with a clear 5xx
(engine.streams catches it); the stream carries on with the next batch.

Steps are named; `step_hook(step, info)` (tests) runs at the start of each one and may raise, which is how
tests inject a fault at every step of a stream's loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from backends.base import Backend, Batch
from core.errors import InferenceFailed
from engine.device import DEVICE_GATE, DeviceTimer, free_cached
from engine.pooling import gather_scores, top_k
from engine.work import Completed, Slot, Work

log = logging.getLogger("rerank_gateway.engine")

STEPS = ("collate", "forward", "sync", "scatter", "pool", "metrics")


@dataclass(slots=True)
class Part:
    """A piece of a batch that was forwarded together (the whole batch, or a half after an OOM)."""

    slots: list[Slot]
    scores: torch.Tensor | None = None
    finite: torch.Tensor | None = None  # host bool per row, copied without blocking before the sync
    error: str | None = None


class BatchRunner:
    """Runs batches of one backend. The scheduler supplies its lock and the callbacks that touch its state."""

    def __init__(
        self,
        backend: Backend,
        *,
        lock: Any,
        metrics: Any,
        on_oom: Callable[[int, int], None],
        fail: Callable[[list[Work], str], None],
        observed: Callable[[int, float], None],
    ) -> None:
        self.backend = backend
        self.name = backend.name
        self.device = backend.device
        self.lock = lock
        self.metrics = metrics
        self.on_oom = on_oom
        self.fail = fail
        self.observed = observed
        # Test-only fault injection: fault_hook(pairs, padded_tokens) before each forward (may raise);
        # step_hook(step, info) at the start of every step.
        self.fault_hook: Callable[[int, int], None] | None = None
        self.step_hook: Callable[[str, Any], None] | None = None

    def _step(self, step: str, info: Any = None) -> None:
        if self.step_hook is not None:
            self.step_hook(step, info)

    # -- the batch ----------------------------------------------------------------------------------------
    def run(self, batch: list[Slot]) -> None:
        timer = DeviceTimer(self.device)
        with DEVICE_GATE.shared(self.device), torch.inference_mode():
            timer.start()
            parts = self.forward_splitting(batch)
            pinned = self.device.type == "cuda"
            for part in parts:
                if part.scores is not None:
                    part.finite = torch.empty(len(part.slots), dtype=torch.bool, pin_memory=pinned)
                    part.finite.copy_(torch.isfinite(part.scores), non_blocking=True)
            timer.stop()
            self._step("sync", batch)
            # The batch's one device sync, inside the guarded step: CUDA reports a kernel's failure here.
            timer.synchronize()
        seconds = timer.seconds()
        self._step("scatter", batch)
        finished, failed = self._scatter(parts, seconds / len(batch))
        for message, works in failed.items():
            self.fail(works, message)
        self._step("pool", batch)
        with torch.inference_mode():
            for work in finished:
                self._answer(work)
        self._step("metrics", batch)
        real = sum(s.length for s in batch)
        padded = sum(len(p.slots) * max(s.length for s in p.slots) for p in parts)
        self.observed(real, seconds)
        if self.metrics:
            self.metrics.observe_batch(self.name, len(batch), real, padded, seconds)

    # -- forward with the OOM policy ----------------------------------------------------------------------
    def forward(self, slots: list[Slot]) -> torch.Tensor:
        items = [s.work.prepared.items[s.item] for s in slots]
        contexts = [s.work.prepared.context for s in slots]
        return self.forward_items(items, contexts)

    def forward_items(self, items: list, contexts: list) -> torch.Tensor:
        self._step("collate", items)
        batch: Batch = self.backend.collate(items, contexts)
        self._step("forward", batch)
        if self.fault_hook is not None:
            width = batch.inputs["input_ids"].shape[1]
            self.fault_hook(len(items), width * len(items))
        return self.backend.forward(batch)

    def forward_splitting(self, batch: list[Slot]) -> list[Part]:
        """Forward the batch; on OOM halve it and retry each half, down to a single pair.

        The retry runs after the `except` block is left: while it is open, the exception's traceback holds
        the failed forward's frames and with them every tensor it had allocated, so a retry from inside the
        handler would run with the failed batch's memory still taken. Outside it they are gone; then the
        allocator's cache is freed for the retry."""
        pending = [batch]
        done: list[Part] = []
        while pending:
            slots = pending.pop(0)
            out_of_memory = False
            try:
                done.append(Part(slots, scores=self.forward(slots)))
            except torch.OutOfMemoryError:
                out_of_memory = True  # no `as exc`: nothing may keep the traceback alive
            if not out_of_memory:
                continue
            free_cached(self.device)
            width = max(s.length for s in slots)
            # What the batch cost against the budget: padded size, or a packed batch's real tokens.
            cost = self.backend.batch_cost([s.work.prepared.items[s.item] for s in slots], [s.work.prepared.context for s in slots])
            self.on_oom(width, cost)
            log.warning("OOM on model %s at %d pairs x %d tokens; splitting", self.name, len(slots), width)
            if len(slots) == 1:
                done.append(Part(slots, error=f"out of memory scoring a single pair of {width} tokens on model {self.name!r}"))
            else:
                mid = len(slots) // 2
                pending[0:0] = [slots[:mid], slots[mid:]]
        return done

    # -- scatter: bookkeeping under the lock, no device work there ------------------------------------------
    def _scatter(self, parts: list[Part], per_pair_s: float) -> tuple[list[Work], dict[str, list[Work]]]:
        per_work: dict[Work, list[tuple[list[int], list[int], torch.Tensor]]] = {}
        failed: dict[str, list[Work]] = {}
        bad: set[Work] = set()
        for part in parts:
            finite = part.finite.tolist() if part.finite is not None else None
            for row, s in enumerate(part.slots):
                if part.error is not None:
                    failed.setdefault(part.error, []).append(s.work)
                    bad.add(s.work)
                elif not finite[row]:
                    if s.work not in bad:
                        failed.setdefault(self._non_finite_message(), []).append(s.work)
                        bad.add(s.work)
                else:
                    entry = per_work.setdefault(s.work, [])
                    if not entry or entry[-1][2] is not part.scores:
                        entry.append(([], [], part.scores))
                    entry[-1][0].append(s.item)
                    entry[-1][1].append(row)
        finished: list[Work] = []
        with self.lock:
            for work, pieces in per_work.items():
                if work in bad or work.state != "queued":
                    continue
                for items, rows, scores in pieces:
                    work.parts.append((items, rows, scores))
                    work.done_items += len(items)
                    work.inference_s += per_pair_s * len(items)
                if work.done_items == work.n_items and work.settle("done"):
                    finished.append(work)
        return finished, {m: list(dict.fromkeys(ws)) for m, ws in failed.items()}

    def _non_finite_message(self) -> str:
        return (
            f"model {self.name!r} produced a score that is not a number (NaN or infinity, e.g. a float16 "
            "overflow) for this request; no ranking is returned"
        )

    # -- pool and answer, outside the lock -----------------------------------------------------------------
    def _answer(self, work: Work) -> None:
        parts = [(items, scores[torch.tensor(rows, device=scores.device)]) for items, rows, scores in work.parts]
        work.parts = []
        raw = gather_scores(work.n_items, parts)
        try:
            indices, scores = top_k(work.prepared, raw, work.top_n, None if work.raw_scores else self.backend.relevance)
        except ValueError:
            work.deliver(error=InferenceFailed(self._non_finite_message()))
            return
        queue_s = (work.started_at or work.enqueued_at) - work.enqueued_at
        work.deliver(Completed(indices=indices, scores=scores, queue_s=queue_s, inference_s=work.inference_s))
