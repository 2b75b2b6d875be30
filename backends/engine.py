"""The batching engine: one Scheduler per loaded model.

Pairs from all concurrent requests share batches bounded by padded tokens (longest x count) and a pair
count. Requests are queued per tenant and served by start-time fair queueing (weights = tenant priority),
so one tenant's 10,000-document job cannot hold back another's 20-document search. Inside a small window
of queued pairs, a batch is built around the oldest pair from the pairs nearest it in length: padding stays
low and no long document waits forever.

Inference threads ("streams") run the forward passes (torch releases the GIL): one on a GPU; on a CPU
several, each running whole batches on its share of the cores. Small encoder GEMMs scale poorly across
OpenMP threads, and one preempted thread stalls every barrier of an op, so on a CPU that other processes
share, two single-threaded streams beat one two-threaded stream by far (bench/, the README benchmark).
Tokenization runs in a small thread pool when a request arrives, overlapping the batches in flight.
Scores stay on the device until a request's last pair is scored, then top-k runs on the device and one
copy brings the result back.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backends.base import CPU_STREAMS, Backend, Encoded, Prepared, configure_cpu_streams
from core.errors import ClientClosedRequest, InferenceFailed, Timeout, TooManyRequests

log = logging.getLogger("rerank_gateway.engine")

# Tokenizers' Rust batch encoder shares one global thread pool that runs jobs in order: a 20-document
# request's encode would wait for another tenant's 10,000-document encode to finish. Requests already run on
# threads of their own, so the library's inner parallelism only costs fairness here.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A window of queued pairs this many batches deep is sorted by length when a batch is built. Deeper windows
# pad less when many small requests mix (8 x a 1,024-token budget: ~93% on 16 clients x 20 mixed-length
# documents, against ~83% at 2) at the cost of a newcomer waiting behind up to this many batches.
WINDOW_BATCHES = 8
# After an OOM the model's token budget is lowered to what fitted, for this long.
OOM_COOLDOWN_S = 60.0
# Requests with at most this many documents are tokenized on a lane of their own, so a 20-document search
# never waits behind another tenant's 10,000-document tokenization (seconds on a CPU).
SMALL_REQUEST_DOCS = 256


def _bulk_thread_priority() -> None:
    """Big requests are tokenized at the lowest CPU priority (Linux thread niceness): they use the cores
    the inference thread and small requests leave idle, instead of taking an equal share from them."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


@dataclass(eq=False)
class Work:
    """One request inside the scheduler."""

    prepared: Prepared
    top_n: int
    raw_scores: bool
    tenant: str
    priority: int
    order: list[int]  # item indices, shortest first
    cursor: int = 0  # next position in `order` not yet pulled into the window
    done_items: int = 0
    scores: torch.Tensor | None = None
    failed: str | None = None
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    inference_s: float = 0.0
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def n_items(self) -> int:
        return len(self.prepared.items)

    def pending_in_queue(self) -> int:
        return self.n_items - self.cursor


@dataclass(slots=True)
class Slot:
    """A queued pair: (work, item index), with its length cached for batching."""

    work: Work
    item: int
    length: int
    seq: int  # pull order, to break ties between equal tags
    # Virtual start time in the fair queue: the slot with the smallest tag anchors the next batch.
    tag: float = 0.0


@dataclass
class Completed:
    indices: list[int]
    scores: list[float]
    queue_s: float
    inference_s: float


class _TenantQueue:
    __slots__ = ("works", "weight", "vtime")

    def __init__(self, weight: float) -> None:
        self.works: collections.deque[Work] = collections.deque()
        self.weight = weight
        self.vtime = 0.0


class FairQueue:
    """Per-tenant queues served by start-time fair queueing on tokens; `priority` orders within a tenant.

    Not thread-safe: the Scheduler holds its lock around every call.
    """

    def __init__(self) -> None:
        self.tenants: dict[str, _TenantQueue] = {}
        self.pairs = 0
        self.tokens = 0
        # Virtual time of the work in service (the tag of the last batch's anchor). Pulls run up to two
        # batches ahead of it, so a newly active tenant starts here, not where the busiest tenant's
        # pulls have got to: otherwise it would queue behind everything already pulled into the window.
        self.vnow = 0.0

    def push(self, work: Work, weight: float) -> None:
        tq = self.tenants.get(work.tenant)
        if tq is None:
            tq = self.tenants[work.tenant] = _TenantQueue(weight)
        tq.weight = weight
        if not tq.works:
            # An idle tenant starts at the current virtual time: idleness banks no credit.
            tq.vtime = max(tq.vtime, self.vnow)
        # Lower priority value first; FIFO among equals.
        pos = len(tq.works)
        while pos > 0 and tq.works[pos - 1].priority > work.priority and tq.works[pos - 1].cursor == 0:
            pos -= 1
        tq.works.insert(pos, work)
        self.pairs += work.n_items
        self.tokens += sum(len(item.input_ids) for item in work.prepared.items)

    def pull(self, budget_tokens: int) -> list[tuple[Work, int, float]]:
        """Take pairs in fair order until about budget_tokens real tokens are taken or the queue is empty."""
        taken: list[tuple[Work, int, float]] = []
        spent = 0
        while spent < budget_tokens:
            active = [(tq.vtime, name) for name, tq in self.tenants.items() if tq.works]
            if not active:
                break
            _, name = min(active)
            tq = self.tenants[name]
            work = tq.works[0]
            # Serve this tenant a small run of its shortest pending pairs, then re-pick a tenant.
            run_tokens = 0
            while work.cursor < work.n_items and run_tokens < max(1, budget_tokens // 4):
                item = work.order[work.cursor]
                work.cursor += 1
                length = len(work.prepared.items[item].input_ids)
                taken.append((work, item, tq.vtime + run_tokens / tq.weight))
                run_tokens += length
                self.pairs -= 1
                self.tokens -= length
            spent += run_tokens
            tq.vtime += run_tokens / tq.weight
            if work.cursor >= work.n_items:
                tq.works.popleft()
        return taken

    def remove(self, work: Work) -> None:
        tq = self.tenants.get(work.tenant)
        if tq is not None and work in tq.works:
            tq.works.remove(work)
            self.pairs -= work.pending_in_queue()
            self.tokens -= sum(len(work.prepared.items[i].input_ids) for i in work.order[work.cursor :])
            work.cursor = work.n_items


class Scheduler:
    """Owns one backend: its queue, its inference streams, its budgets."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        max_queue_pairs: int,
        max_queue_tokens: int,
        metrics: Any = None,
        tokenize_threads: int = 2,
        streams: int | None = None,
        cpu_streams: int = CPU_STREAMS,
    ) -> None:
        self.backend = backend
        self.name = backend.name
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_queue_pairs = max_queue_pairs
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        # Test-only fault injection: called with (pairs, padded_tokens) before each forward; may raise.
        self.fault_hook: Callable[[int, int], None] | None = None
        self.oom_recoveries = 0
        self._token_cap = max_batch_tokens
        self._cap_until = 0.0
        self._queue = FairQueue()
        self._window: list[Slot] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stopping = False
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(
            tokenize_threads, thread_name_prefix=f"tok-{self.name}", initializer=_bulk_thread_priority
        )
        self._small_tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"tok-small-{self.name}")
        if streams is None:
            streams = 1 if backend.device.type != "cpu" else configure_cpu_streams(cpu_streams)
        self._threads = [
            threading.Thread(target=self._run, name=f"infer-{self.name}-{k}", daemon=True) for k in range(streams)
        ]
        # Throughput estimate (real tokens/s of one stream) for Retry-After.
        self._tokens_per_s = 5_000.0
        for thread in self._threads:
            thread.start()

    # -- public, called from the event loop ------------------------------------------------------------
    @property
    def streams(self) -> int:
        """Inference threads running batches of this model (one on a GPU)."""
        return len(self._threads)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    @property
    def token_budget(self) -> int:
        if self._cap_until and time.monotonic() > self._cap_until:
            self._token_cap, self._cap_until = self.max_batch_tokens, 0.0
        return min(self.max_batch_tokens, self._token_cap)

    def queue_depth(self) -> tuple[int, int]:
        with self._cv:
            window_tokens = sum(s.length for s in self._window)
            return self._queue.pairs + len(self._window), self._queue.tokens + window_tokens

    async def prepare(self, query: str, documents: list[str], **kwargs: Any) -> Prepared:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        pool = self._small_tokenizer_pool if len(documents) <= SMALL_REQUEST_DOCS else self._tokenizer_pool
        prepared = await loop.run_in_executor(pool, lambda: self.backend.prepare(query, documents, **kwargs))
        if self.metrics:
            self.metrics.tokenize_seconds.labels(self.name).observe(time.perf_counter() - start)
        return prepared

    def admit(self, prepared: Prepared) -> None:
        """Refuse (429) when the queue is full. A request alone in an empty queue is always admitted, so a
        10,000-document request is never refused for its size alone."""
        pairs, tokens = self.queue_depth()
        if pairs and (pairs + len(prepared.items) > self.max_queue_pairs or tokens + prepared.tokens > self.max_queue_tokens):
            raise TooManyRequests(
                f"model {self.name!r} is overloaded ({pairs} pairs queued); retry later",
                retry_after_s=tokens / max(self._tokens_per_s * len(self._threads), 1.0),
            )

    async def submit(
        self,
        prepared: Prepared,
        *,
        top_n: int,
        raw_scores: bool = False,
        tenant: str = "",
        weight: float = 1.0,
        priority: int = 0,
        timeout_s: float | None = None,
        disconnected: asyncio.Future | None = None,
    ) -> Completed:
        """Queue a prepared request and wait for its top_n. Cancels its queued pairs on timeout,
        client disconnect or task cancellation."""
        self.admit(prepared)
        order = sorted(range(len(prepared.items)), key=lambda i: len(prepared.items[i].input_ids))
        work = Work(prepared=prepared, top_n=top_n, raw_scores=raw_scores, tenant=tenant, priority=priority, order=order)
        if not prepared.items:
            work.future.set_result(Completed([], [], 0.0, 0.0))
        else:
            with self._cv:
                self._queue.push(work, weight)
                self._cv.notify_all()  # every idle stream: a big request has batches for all of them
        waiter = asyncio.wrap_future(work.future)
        try:
            if disconnected is None:
                return await asyncio.wait_for(waiter, timeout_s)
            done, _ = await asyncio.wait({waiter, disconnected}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                return waiter.result()
            if disconnected in done:
                raise ClientClosedRequest(f"client disconnected; its pairs for model {self.name!r} were dropped")
            raise TimeoutError
        except TimeoutError:
            self.cancel(work)
            raise Timeout(f"request to model {self.name!r} did not finish within {timeout_s:g} s") from None
        except BaseException:
            self.cancel(work)
            raise

    def cancel(self, work: Work) -> None:
        with self._cv:
            if work.future.done():
                return
            work.cancelled = True
            self._queue.remove(work)
            self._window = [s for s in self._window if s.work is not work]
        if self.metrics:
            self.metrics.cancelled.labels(self.name).inc()

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self._small_tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    # -- warm-up: the budget is proven at start, not in production --------------------------------------
    def warmup(self, length: int) -> dict[str, float]:
        """Run one batch at the full token budget and measure peak device memory."""
        length = max(2, min(length, self.max_batch_tokens))
        n = max(1, min(self.max_batch_size, self.max_batch_tokens // length))
        items = [self.backend.synthetic_item(length) for _ in range(n)]
        contexts = [self.backend.synthetic_context() for _ in range(n)]
        device = self.backend.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        with torch.inference_mode():
            self.backend.forward(self.backend.collate(items, contexts))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            activation = peak - base
        else:
            peak = activation = 0
        return {"pairs": n, "length": length, "seconds": time.perf_counter() - start, "peak_bytes": peak, "activation_bytes": activation}

    # -- the inference thread -----------------------------------------------------------------------------
    def _next_batch(self) -> list[Slot] | None:
        """Block until there is work; return the next batch (or None when stopping)."""
        with self._cv:
            while True:
                if self._stopping:
                    return None
                budget = self.token_budget
                window_tokens = sum(s.length for s in self._window)
                want = WINDOW_BATCHES * budget - window_tokens
                if want > 0:
                    for work, item, tag in self._queue.pull(want):
                        self._window.append(Slot(work, item, len(work.prepared.items[item].input_ids), next(self._seq), tag))
                if self._window:
                    return self._take_batch(budget)
                self._cv.wait()

    def _take_batch(self, budget: int) -> list[Slot]:
        first = min(self._window, key=lambda s: (s.tag, s.seq))
        self._queue.vnow = max(self._queue.vnow, first.tag)
        own = [s for s in self._window if s.work is first.work]
        width = max(s.length for s in own)
        other_tenants = any(s.work.tenant != first.work.tenant for s in self._window)
        if other_tenants and len(own) <= self.max_batch_size and width * len(own) <= budget:
            # The anchor's request fits one batch: it goes whole, so a small search is not spread over
            # several batches of another tenant's work. Others' pairs no longer than it fill the rest.
            # Within one tenant the plain length run below pads less, and fairness is not at stake.
            room = min(self.max_batch_size, budget // width) - len(own)
            filler = sorted((s for s in self._window if s.work is not first.work and s.length <= width), key=lambda s: (s.tag, s.seq))
            batch = own + filler[: max(room, 0)]
            taken = {id(s) for s in batch}
            self._window = [s for s in self._window if id(s) not in taken]
            return batch
        window = sorted(self._window, key=lambda s: s.length)
        anchor = next(i for i, s in enumerate(window) if s is first)
        lo = hi = anchor  # inclusive bounds of the run in length order; window[hi] is its widest pair
        # Grow the run by whichever neighbour is nearer in length, while the padded size fits the budget.
        while hi - lo + 1 < self.max_batch_size:
            count = hi - lo + 2
            options = []
            if hi + 1 < len(window) and window[hi + 1].length * count <= budget:
                options.append((window[hi + 1].length - window[hi].length, 1))
            if lo > 0 and window[hi].length * count <= budget:
                options.append((window[hi].length - window[lo - 1].length, -1))
            if not options:
                break
            if min(options)[1] == 1:
                hi += 1
            else:
                lo -= 1
        batch = window[lo : hi + 1]
        self._window = window[:lo] + window[hi + 1 :]
        return batch

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [s for s in batch if not s.work.cancelled]
            if not batch:
                continue
            start = time.perf_counter()
            for s in batch:
                if s.work.started_at is None:
                    s.work.started_at = start
            try:
                with torch.inference_mode():
                    results = self._score(batch)
            except Exception as exc:  # noqa: BLE001 - a broken batch fails its requests, never the thread
                log.exception("batch failed on model %s", self.name)
                results = [(batch, None, f"{type(exc).__name__}: {exc}")]
            elapsed = time.perf_counter() - start
            real = sum(s.length for s in batch)
            self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (real / max(elapsed, 1e-6))
            if self.metrics:
                padded = len(batch) * max(s.length for s in batch)
                self.metrics.observe_batch(self.name, len(batch), real, padded, elapsed)
            with self._cv, torch.inference_mode():
                self._scatter(results, elapsed / len(batch))

    def _score(self, batch: list[Slot]) -> list[tuple[list[Slot], torch.Tensor | None, str | None]]:
        """Forward a batch; on OOM free the cache, halve it and retry, down to a single pair."""
        width = max(s.length for s in batch)
        try:
            if self.fault_hook is not None:
                self.fault_hook(len(batch), width * len(batch))
            items: list[Encoded] = [s.work.prepared.items[s.item] for s in batch]
            contexts = [s.work.prepared.context for s in batch]
            scores = self.backend.forward(self.backend.collate(items, contexts))
            return [(batch, scores, None)]
        except torch.OutOfMemoryError:
            self.oom_recoveries += 1
            if self.metrics:
                self.metrics.oom_recoveries.labels(self.name).inc()
            if self.backend.device.type == "cuda":
                torch.cuda.empty_cache()
            padded = width * len(batch)
            # What did not fit lowers the budget for a while; new batches are built under the cap.
            self._token_cap = max(width, min(self._token_cap, padded // 2))
            self._cap_until = time.monotonic() + OOM_COOLDOWN_S
            log.warning("OOM on model %s at %d pairs x %d tokens; splitting", self.name, len(batch), width)
            if len(batch) == 1:
                return [(batch, None, f"out of memory scoring a single pair of {width} tokens on model {self.name!r}")]
            mid = len(batch) // 2
            return self._score(batch[:mid]) + self._score(batch[mid:])

    def _scatter(self, results, per_pair_s: float) -> None:
        finished: list[Work] = []
        for slots, scores, error in results:
            by_work: dict[Work, tuple[list[int], list[int]]] = {}
            for k, s in enumerate(slots):
                if s.work.cancelled or s.work.future.done():
                    continue
                rows, items = by_work.setdefault(s.work, ([], []))
                rows.append(k)
                items.append(s.item)
            for work, (rows, items) in by_work.items():
                if error is not None:
                    work.failed = error
                    finished.append(work)
                    continue
                if work.scores is None:
                    work.scores = torch.full((work.n_items,), float("-inf"), device=scores.device, dtype=torch.float32)
                device = scores.device
                work.scores.index_copy_(0, torch.tensor(items, device=device), scores[torch.tensor(rows, device=device)])
                work.done_items += len(items)
                work.inference_s += per_pair_s * len(items)
                if work.done_items == work.n_items:
                    finished.append(work)
        for work in dict.fromkeys(finished):
            if work.future.done():
                continue
            if work.failed:
                self.cancel(work)
                work.future.set_exception(InferenceFailed(work.failed))
                continue
            work.future.set_result(self._top_n(work))

    def _top_n(self, work: Work) -> Completed:
        p = work.prepared
        raw = work.scores
        assert raw is not None
        if len(p.doc_index) != p.n_docs or p.doc_index != list(range(p.n_docs)):
            # Chunked documents: a document scores as its best chunk.
            index = torch.tensor(p.doc_index, device=raw.device)
            per_doc = torch.full((p.n_docs,), float("-inf"), device=raw.device).scatter_reduce(0, index, raw, "amax")
        else:
            per_doc = raw
        scores = per_doc if work.raw_scores else self.backend.relevance(per_doc)
        values, indices = torch.topk(scores, min(work.top_n, p.n_docs))
        # One device-to-host copy per request; float64 holds every index exactly.
        both = torch.stack([values.double(), indices.double()]).cpu()
        now = time.perf_counter()
        queue_s = (work.started_at or now) - work.enqueued_at
        return Completed(
            indices=[int(i) for i in both[1].tolist()],
            scores=both[0].tolist(),
            queue_s=queue_s,
            inference_s=work.inference_s,
        )
