"""One batch, end to end, inside the failure boundary: collate, forward (with the OOM policy), the device
sync, metrics, scatter, pooling and top-k. Any error fails the requests of that batch with a clear 5xx
(engine.streams catches it); the stream carries on with the next batch.

Steps are named; `step_hook(step, info)` (tests) runs at the start of each one and may raise, which is how
tests inject a fault at every step of a stream's loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from backends.base import Backend, Batch, Rows
from core.errors import InferenceFailed
from engine.batching import Group, Plan
from engine.device import DEVICE_GATE, DeviceTimer, free_cached
from engine.pooling import top_k
from engine.step_time import StepClock
from engine.work import Answer, Completed, Work, deliver

log = logging.getLogger("rerank_gateway.engine")

STEPS = ("collate", "forward", "sync", "metrics", "scatter", "pool")
# Timed (engine.step_time) but not a hook's step: waiting for the launch lock before collating.
WAIT_LAUNCH = "wait_launch"


@dataclass(slots=True)
class Part:
    """A piece of a batch that was forwarded together (the whole batch, or a half after an OOM)."""

    plan: Plan
    scores: torch.Tensor | None = None
    finite: torch.Tensor | None = None  # host bool per row, copied without blocking before the sync
    error: str | None = None


class BatchRunner:
    """Runs batches of one backend. The scheduler supplies its lock and the callbacks that touch its state.

    On a GPU two inference threads share the model's CUDA stream (engine.streams): while one waits for its
    batch's kernels, the other collates the next batch into pinned memory and launches it behind them, so
    the device does not idle while the host prepares work. `launch` keeps one batch's copies and kernels
    together on the stream (its timing events bracket that batch alone)."""

    def __init__(
        self,
        backend: Backend,
        *,
        lock: Any,
        metrics: Any,
        on_oom: Callable[[int, int], None],
        fail: Callable[[list[Work], str], None],
        observed: Callable[[int, float], None],
        cost: Callable[[Plan], int],
    ) -> None:
        self.backend = backend
        self.name = backend.name
        self.device = backend.device
        self.lock = lock
        self.metrics = metrics
        self.on_oom = on_oom
        self.fail = fail
        self.observed = observed
        self.cost = cost
        self.launch = threading.Lock() if self.device.type == "cuda" else contextlib.nullcontext()
        # Pooling and top-k run on a stream of their own: their device-to-host copy must wait for this
        # request's scores only, not for the next batch the other thread has already launched behind them.
        self.pool_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Test-only fault injection: fault_hook(pairs, tokens the forward computes) before each forward (may raise);
        # step_hook(step, info) at the start of every step.
        self.fault_hook: Callable[[int, int], None] | None = None
        self.step_hook: Callable[[str, Any], None] | None = None
        # The batch each inference thread is running has its StepClock here (engine.step_time): `_step`
        # marks it, so a step's time, a test hook's hold included, is the step's.
        self._clocks = threading.local()

    def _step(self, step: str, info: Any = None) -> None:
        clock = getattr(self._clocks, "current", None)
        if clock is not None:
            clock.mark(step)
        if self.step_hook is not None:
            self.step_hook(step, info)

    # -- the batch ----------------------------------------------------------------------------------------
    def run(self, plan: Plan) -> None:
        clock = plan.clock or StepClock(None)
        self._clocks.current = clock
        try:
            self._run(plan, clock)
        finally:
            self._clocks.current = None

    def _run(self, plan: Plan, clock: StepClock) -> None:
        timer = DeviceTimer(self.device)
        # On a GPU, the other inference thread's collation and launch hold the stream's launch lock: that
        # wait is its own step, not the build's nor this batch's collation.
        clock.mark(WAIT_LAUNCH)
        with DEVICE_GATE.shared(self.device), torch.inference_mode():
            with self.launch:
                parts = self.forward_splitting(plan, timer)
                pinned = self.device.type == "cuda"
                for part in parts:
                    if part.scores is not None:
                        part.finite = torch.empty(len(part.plan), dtype=torch.bool, pin_memory=pinned)
                        part.finite.copy_(torch.isfinite(part.scores), non_blocking=True)
                timer.stop()
            self._step("sync", plan)
            # The batch's one device sync, inside the guarded step: CUDA reports a kernel's failure here.
            timer.synchronize()
        seconds = timer.seconds()
        # Counted before its scores reach their requests, so a client that reads /metrics after its response
        # finds every batch of its request there: counted after the scatter, a batch of the other thread
        # could complete and answer the request first (a loaded 2-core CI machine read 423 of 981 tokens).
        self._step("metrics", plan)
        real = plan.real_tokens
        # The tokens the batch cost, as the budget counts them (engine.batching.BatchCost): padded rows, a
        # packed batch's real tokens, a shared prefix once and its share of each row. The measured rate is in
        # these units too, so a batch bounded by time at that rate (engine.scheduler.bulk_run_budget) runs
        # that long.
        computed = sum(self.cost(p.plan) for p in parts)
        self.observed(computed, seconds)
        if self.metrics:
            self.metrics.observe_batch(self.name, len(plan), real, computed, seconds)
        self._step("scatter", plan)
        finished, failed = self._scatter(parts, seconds / len(plan))
        for message, works in failed.items():
            self.fail(works, message)
        self._step("pool", plan)
        answers: list[Answer] = []
        try:
            with torch.inference_mode(), _on(self.pool_stream):
                for work in finished:
                    answers.append(self._answer(work))
        finally:
            # The batch's steps, counted before its own answers are handed over.
            clock.mark(None)
            if self.metrics:
                self.metrics.observe_steps(self.name, clock.spent)
            # The batch's answers in one hand-off (one wake-up of the loop), those made before a failure too.
            deliver(answers)

    # -- forward with the OOM policy ----------------------------------------------------------------------
    def forward(self, plan: Plan, timer: DeviceTimer | None = None) -> torch.Tensor:
        self._step("collate", plan)
        return self.forward_rows(plan.rows(), collated=True, timer=timer)

    def forward_rows(self, rows: Rows, collated: bool = False, timer: DeviceTimer | None = None) -> torch.Tensor:
        """`timer` starts once the batch is collated: the device time of a batch is its kernels', not the
        host's collation (on a GPU the other host thread's batch runs meanwhile, and a start event recorded
        before collating would count the stream's idle wait for this host as device time)."""
        if not collated:
            self._step("collate", rows)
        batch: Batch = self.backend.collate(rows)
        if timer is not None:
            timer.start()
        self._step("forward", batch)
        if self.fault_hook is not None:
            self.fault_hook(len(rows), batch.inputs["input_ids"].numel())  # a packed batch is one row
        return self.backend.forward(batch)

    def forward_splitting(self, plan: Plan, timer: DeviceTimer | None = None) -> list[Part]:
        """Forward the batch; on OOM halve it and retry each half, down to a single pair.

        The retry runs after the `except` block is left: while it is open, the exception's traceback holds
        the failed forward's frames and with them every tensor it had allocated, so a retry from inside the
        handler would run with the failed batch's memory still taken. Outside it they are gone; then the
        allocator's cache is freed for the retry."""
        pending = [plan]
        done: list[Part] = []
        while pending:
            piece = pending.pop(0)
            out_of_memory = False
            try:
                done.append(Part(piece, scores=self.forward(piece, timer)))
            except torch.OutOfMemoryError:
                out_of_memory = True  # no `as exc`: nothing may keep the traceback alive
            if not out_of_memory:
                continue
            free_cached(self.device)
            width = int(piece.lengths.max())
            # What the batch cost against the budget: padded size, a packed batch's real tokens, or prefix groups.
            self.on_oom(width, self.cost(piece))
            log.warning("OOM on model %s at %d pairs x %d tokens; splitting", self.name, len(piece), width)
            if len(piece) == 1:
                done.append(Part(piece, error=f"out of memory scoring a single pair of {width} tokens on model {self.name!r}"))
            else:
                pending[0:0] = list(piece.split())
        return done

    # -- scatter: bookkeeping under the lock, no device work there ------------------------------------------
    def _scatter(self, parts: list[Part], per_pair_s: float) -> tuple[list[Work], dict[str, list[Work]]]:
        """Each group's scores to its request; a request whose last pair this was is settled."""
        failed: dict[str, list[Work]] = {}
        bad: set[Work] = set()
        scored: list[tuple[Group, torch.Tensor]] = []
        for part in parts:
            if part.error is not None:
                for work in part.plan.works:
                    failed.setdefault(part.error, []).append(work)
                    bad.add(work)
                continue
            finite = part.finite.numpy()
            start = 0
            for group in part.plan.groups:
                stop = start + len(group.items)
                if not finite[start:stop].all():
                    if group.work not in bad:
                        failed.setdefault(self._non_finite_message(), []).append(group.work)
                        bad.add(group.work)
                else:
                    scored.append((group, part.scores[start:stop]))
                start = stop
        finished: list[Work] = []
        with self.lock:
            for group, scores in scored:
                work = group.work
                if work in bad or work.state != "queued":
                    continue
                work.scored.append((group.part, group.items, scores))
                work.done_items += len(group.items)
                work.inference_s += per_pair_s * len(group.items)
                if work.complete and work.settle("done"):
                    finished.append(work)
        return finished, {m: list(dict.fromkeys(ws)) for m, ws in failed.items()}

    def _non_finite_message(self) -> str:
        return (
            f"model {self.name!r} produced a score that is not a number (NaN or infinity, e.g. a float16 "
            "overflow) for this request; no ranking is returned"
        )

    # -- pool and answer, outside the lock -----------------------------------------------------------------
    def _answer(self, work: Work) -> Answer:
        raw, doc_index, n_docs = work.raw_scores_by_doc(self.device)
        try:
            indices, scores = top_k(raw, doc_index, n_docs, work.top_n, None if work.raw_scores else self.backend.relevance)
        except ValueError:
            return work, None, InferenceFailed(self._non_finite_message())
        finally:
            # Only now: top_k's copy to the host has waited for every read of the batches' scores (another
            # stream's allocations may reuse their memory once they are freed).
            work.scored = []
        queue_s = (work.started_at or work.enqueued_at) - work.enqueued_at
        return work, Completed(indices=indices, scores=scores, queue_s=queue_s, inference_s=work.inference_s), None


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """Work on `stream` (None: stay on the current one). Its reads of a finished batch's scores need no
    wait: the batch was synchronised before its scores were handed to the requests."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
