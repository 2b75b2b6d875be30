"""The Scheduler: the facade the gateway uses, one per loaded model.

It owns the model's queue (engine.fair_queue), the window of pulled pairs and batch building
(engine.batching), the inference streams (engine.streams) running batches (engine.inference), the
tokenizer lanes (engine.lanes), admission (engine.admission) and the token budget with its OOM cap.

A request is tokenized in slices on the tokenizer lanes, and each slice joins the queue as soon as it is
ready (from the tokenizer thread), so the device starts on a big request's first pairs while the rest are
still tokenizing (`rerank`). `prepare` + `submit` do the same in two steps for callers that hold a
tokenized request already (tools, tests).

Locking: one condition variable guards the queue, the window, the reservations and the requests'
bookkeeping. The event loop and the tokenizer threads take it briefly (admission, adding a slice, cancel),
so nothing under it touches the device: batches are collated, forwarded, synchronised and pooled outside it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from backends.base import Backend, Prepared, configure_cpu_streams
from core.budgets import LADDER_MAX_BATCH_S, climbing
from core.errors import ClientClosedRequest, InferenceFailed, Timeout, TooManyRequests
from core.heap import HEAP
from core.host import CPU_STREAMS
from engine.admission import Held, Reservations, estimate_cost
from engine.batch_time import BatchTimes
from engine.batching import SMALL_SHARE, BatchCost, Plan, is_small, plan_of, take_batch
from engine.device import StreamContext, free_cached
from engine.fair_queue import FairQueue
from engine.inference import BatchRunner
from engine.lanes import SMALL_REQUEST_DOCS, TokenizerLanes, default_small_threads
from engine.step_time import StepClock
from engine.streams import InferenceStreams
from engine.warmup import rate_shape, run_rate, run_warmup, warmup_shapes
from engine.window import Window
from engine.work import Completed, Work, deliver, new_work

log = logging.getLogger("rerank_gateway.engine")

# A window of queued pairs this many batches deep is sorted by length when a batch is built. Deeper windows
# pad less when many small requests mix (8 x a 1,024-token budget: ~93% on 16 clients x 20 mixed-length
# documents, against ~83% at 2) at the cost of a newcomer waiting behind up to this many batches.
WINDOW_BATCHES = 8
# For this long after a small request (a search: at most 1/SMALL_SHARE of the budget) was queued, bulk
# requests' batches take at most 1/SEARCH_RUN_SHARE of the budget, so the next search waits for a shorter
# batch in flight. The fairness test's tiny BERT (1,024 tokens, 1 stream on 2 cores), a 3-document search
# beside 2,000-document requests of its tenant, p99 over alone: 2.6-4.2x at 1/2, 1.4-2.8x at 1/4. The
# price: a bulk request beside a closed loop of searches ran 2.8x (1/2) and 4.5x (1/4) its time alone,
# against 1.6x with full batches, while the loop completed 356 and 708 searches against 191.
SEARCH_RECENT_S = 1.0
SEARCH_RUN_SHARE = 4
# On a GPU a bulk request's batch is also bounded by time while searches arrive, at the measured rate (tokens
# the forward computes, as the budget counts them, per second of device time): a search waits for the batch
# in flight and the one launched behind it, so those take at most SEARCH_BATCH_S each. (On a CPU the token
# budget is already small: its measured rule above stands.)
SEARCH_BATCH_S = 0.010
# After an OOM the model's token budget is lowered to what fitted, for this long.
OOM_COOLDOWN_S = 60.0
# Host threads per model on a GPU, sharing its CUDA stream (one launches while the other waits).
GPU_HOST_THREADS = 2


# A slice's check before it is queued (the runner's limits: chunks per request, truncation off): raises to
# refuse the whole request. Arguments: the slice, the request-wide index of each of its documents, and the
# request's pairs with it.
SliceCheck = Callable[[Prepared, np.ndarray, int], None]


def forward_on_host(backend: Backend) -> bool:
    """Whether the model's forward runs on the host's cores (the CPU), where the host's own threads (the
    tokenizer lanes, the event loop) compete with it for them. The host-side rules that depend on it follow
    from this one fact: streams_slices and the small tokenizer lane's threads (engine.lanes). (What needs a
    CUDA device itself, the measured rate that bounds batches by time, is device_timed.)"""
    return backend.device.type == "cpu"


def device_timed(backend: Backend) -> bool:
    """Whether a batch's seconds are the device's own (CUDA events on the model's stream), so that the
    measured rate says how long a batch of so many tokens holds the device and a bulk batch can be bounded by
    time while searches arrive (bulk_run_budget). Elsewhere a batch is timed by the host's clock around the
    call, and on the CPU the token budget is already small."""
    return backend.device.type == "cuda"


def streams_slices(backend: Backend) -> bool:
    """Whether a big request's slices join the queue as each is tokenized, so that the device starts on its
    first pairs while the rest tokenize, or the request is queued whole once every slice is.

    A packed batch costs its real tokens however its lengths mix: streamed. A padded backend on a GPU:
    streamed too, in order of length (slice_order): queued whole, the device waits for the whole request to
    tokenize, which bench.fast_device puts at a fifth of a 1,000-document request's time before a simulated
    device at 200,000 tokens/s (device busy 81% against 95% streamed; pairs/s 1.19x streamed, 2-core AMD
    EPYC). A padded backend on the CPU: whole. Its forward runs on the cores the tokenizers use, so starting
    it early gains no time and the threads contend: streamed by length, bench.host_path's big request ran
    0.92x (0.82-0.97 in four rounds, ONNX Runtime) with 13% more CPU a pair, though its batches padded less."""
    return not backend.is_padded or not forward_on_host(backend)


def parallel_batches(backend: Backend, streams: int) -> int:
    """How many batches run at once, each at the measured rate: on the CPU every inference thread runs its
    own on its share of the cores; before a device the threads share one stream, whose batches run one after
    another (the rate is measured in device time)."""
    return streams if forward_on_host(backend) else 1


def slice_order(documents: Sequence[str], *, by_length: bool) -> np.ndarray:
    """The order a request's documents are sliced in for tokenizing: shortest first for a padded backend's
    streamed big request (characters track tokens), else as they came.

    The batches that run before a streamed request's last slice arrives are built from the slices queued so
    far. Sliced as they came, each slice holds every length and those batches pad: streamed so, the tiny
    cross-encoder of bench.host_path padded 0.88 of its batches' tokens with real ones against 0.98 queued
    whole. Sliced by length, each slice is a run of similar lengths (tests/test_streamed_slices.py: 0.97-0.98
    against 0.90-0.92). A search is one slice: it keeps its order."""
    if not by_length or len(documents) <= SMALL_REQUEST_DOCS:
        return np.arange(len(documents))
    return np.argsort(np.fromiter(map(len, documents), np.int64, len(documents)), kind="stable")


def bulk_run_budget(budget: int, *, searching: bool, times: BatchTimes | None) -> int:
    """The budget of a bulk request's length run: the whole budget, a share of it while searches arrive,
    and where batches are device-timed (`times`, a GPU) at most SEARCH_BATCH_S of device time then, by the
    batches' measured floor and rate. Never under twice the floor: a model whose every batch costs more
    than SEARCH_BATCH_S (a 4B model's hundreds of kernels) would otherwise run bulk work one pair a batch,
    nearly all of it floor, while searches arrive."""
    if not searching:
        return budget
    run = budget // SEARCH_RUN_SHARE
    if times is None:
        return run
    return min(run, max(1, times.tokens_within(max(SEARCH_BATCH_S, 2 * times.floor_s))))


@dataclass(eq=False)
class _Control:
    """A call to run inside an inference thread (the warm-up), between batches."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future


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
        tokenize_threads: int | None = None,
        streams: int | None = None,
        cpu_streams: int = CPU_STREAMS,
        stream_slices: bool | None = None,
    ) -> None:
        """stream_slices: whether a big request's slices are queued as each is tokenized (None: the backend's
        default, streams_slices)."""
        self.backend = backend
        self.name = backend.name
        self.stream_slices = streams_slices(backend) if stream_slices is None else stream_slices
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_queue_pairs = max_queue_pairs
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self.oom_recoveries = 0
        # Why the model cannot serve now (a stream died and is restarting), or None.
        self.unavailable_reason: str | None = None
        self.on_health: Callable[[str | None], None] | None = None
        self._token_cap = max_batch_tokens
        self._cap_until = 0.0
        self._search_at = float("-inf")  # when the last small request was queued (time.monotonic)
        self._queue = FairQueue()
        self._window = Window()
        self._cost = BatchCost(backend.is_padded, backend.padded_width, backend.prefix_row_share)
        self._control: list[_Control] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._reserved = Reservations()
        self._lanes = TokenizerLanes(self.name, tokenize_threads, small_threads=default_small_threads(forward_on_host(backend)))
        self._workspace_bytes = 0
        # A batch's device time by its tokens (floor + tokens / rate), from the batches run: bounds bulk batches
        # by time while searches arrive (on a GPU) and estimates Retry-After.
        self._times = BatchTimes(5_000.0)
        self.runner = BatchRunner(
            backend, lock=self._cv, metrics=metrics, on_oom=self._lower_budget, fail=self._fail_works, observed=self._observed,
            cost=self._cost.of_plan,
        )
        if streams is None:
            # On a GPU two host threads share the model's CUDA stream: one prepares and launches the next
            # batch while the other waits for its own (engine.inference). On a CPU, whole batches in parallel.
            streams = GPU_HOST_THREADS if backend.device.type != "cpu" else configure_cpu_streams(cpu_streams)
        self._streams = InferenceStreams(
            self.name, streams, StreamContext(backend.device),
            take=self._next_job, run=self._run_job, fail=self._fail_job, on_health=self._health, taken=self._taken,
        )

    # -- test hooks (see engine.inference) ----------------------------------------------------------------
    @property
    def fault_hook(self) -> Callable[[int, int], None] | None:
        return self.runner.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: Callable[[int, int], None] | None) -> None:
        self.runner.fault_hook = hook

    @property
    def step_hook(self) -> Callable[[str, Any], None] | None:
        return self.runner.step_hook

    @step_hook.setter
    def step_hook(self, hook: Callable[[str, Any], None] | None) -> None:
        self.runner.step_hook = hook

    # -- state, read from the event loop --------------------------------------------------------------------
    @property
    def streams(self) -> int:
        """Inference threads running batches of this model (two sharing one CUDA stream on a GPU)."""
        return self._streams.count

    @property
    def running(self) -> bool:
        return not self._stopping and self._streams.alive

    @property
    def restarts(self) -> int:
        return self._streams.restarts

    @property
    def token_budget(self) -> int:
        if self._cap_until and time.monotonic() > self._cap_until:
            self._token_cap, self._cap_until = self.max_batch_tokens, 0.0
        return min(self.max_batch_tokens, self._token_cap)

    def queue_depth(self) -> tuple[int, int]:
        with self._cv:
            return self._queue.pairs + len(self._window), self._queue.tokens + self._window.tokens

    # -- admission and submission ---------------------------------------------------------------------------
    def _check_room(self, pairs: int, tokens: int) -> None:
        """429 when the queue (with the requests being tokenized) is full. A request alone is always
        admitted, so a 10,000-document request is never refused for its size alone."""
        with self._cv:
            queued_pairs = self._queue.pairs + len(self._window) + self._reserved.pairs
            queued_tokens = self._queue.tokens + self._window.tokens + self._reserved.tokens
        if queued_pairs and (queued_pairs + pairs > self.max_queue_pairs or queued_tokens + tokens > self.max_queue_tokens):
            raise TooManyRequests(
                f"model {self.name!r} is overloaded ({queued_pairs} pairs queued); retry later",
                retry_after_s=queued_tokens / max(self._times.tokens_per_s * parallel_batches(self.backend, self.streams), 1.0),
            )

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        tokenize: dict[str, Any],
        check: SliceCheck | None = None,
        top_n: int,
        raw_scores: bool = False,
        tenant: str = "",
        weight: float = 1.0,
        priority: int = 0,
        timeout_s: float | None = None,
        disconnected: asyncio.Future | None = None,
    ) -> Completed:
        """Tokenize (in slices on the tokenizer lanes) and score a request: its top_n, with the tokens and
        pairs it is metered for. `check` may refuse the request from any slice.

        On a GPU, and for a packed backend, each slice joins the queue as soon as it is tokenized, so the device
        starts on a big request's first pairs while the rest tokenize; a padded backend's slices are runs of
        similar lengths. A padded backend on the CPU queues the request whole (streams_slices says why)."""
        pairs, tokens = estimate_cost(query, documents, max_length=tokenize.get("max_length", 512), max_chunks=tokenize.get("max_chunks", 1))
        self._check_room(pairs, tokens)
        held = self._reserve(pairs, tokens)
        work = self._open(top_n=top_n, raw_scores=raw_scores, tenant=tenant, weight=weight, priority=priority, docs=len(documents))
        stream = self.stream_slices
        order = slice_order(documents, by_length=stream and self.backend.is_padded)
        start = time.perf_counter()
        try:
            try:
                parts = await self._lanes.run(
                    len(documents), lambda a, b: self._tokenize_slice(work, query, documents, order[a:b], tokenize, check, held, stream)
                )
            finally:
                self._release(held)
            if self.metrics:
                self.metrics.tokenize_seconds.labels(self.name).observe(time.perf_counter() - start)
            if any(p is None for p in parts):  # the request failed while slices tokenized: its future says why
                await work.future
            tokenize_s = time.perf_counter() - start
            if not stream:
                whole = parts[0] if len(parts) == 1 else self.backend.merge(parts)  # type: ignore[arg-type]
                with self._cv:
                    if work.state == "queued":
                        self._add(work, whole, order)
            done = await self._wait(work, timeout_s, disconnected)
            done.tokenize_s = tokenize_s
            done.tokens = self.backend.metered_tokens(parts)  # type: ignore[arg-type]
            done.items = sum(p.n_items for p in parts)  # type: ignore[union-attr]
            return done
        except BaseException:
            self.cancel(work)
            raise

    async def prepare(self, query: str, documents: Sequence[str], **kwargs: Any) -> Prepared:
        """Tokenize a whole request (in slices on the lanes, merged), after checking an estimate of its cost
        against the queue limits; `submit` queues it."""
        pairs, tokens = estimate_cost(query, documents, max_length=kwargs.get("max_length", 512), max_chunks=kwargs.get("max_chunks", 1))
        self._check_room(pairs, tokens)
        held = self._reserve(pairs, tokens)
        start = time.perf_counter()
        try:
            parts = await self._lanes.run(len(documents), lambda a, b: self.backend.prepare(query, list(documents[a:b]), **kwargs))
        finally:
            self._release(held)
        if self.metrics:
            self.metrics.tokenize_seconds.labels(self.name).observe(time.perf_counter() - start)
        return parts[0] if len(parts) == 1 else self.backend.merge(parts)

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
        """Queue a tokenized request and wait for its top_n. Its queued pairs leave the queue on every way
        out: answered, failed, timed out, client gone, task cancelled."""
        self._check_room(prepared.n_items, int(prepared.lengths.sum()))
        if not prepared.n_items:
            return Completed([], [], 0.0, 0.0, tokens=prepared.tokens)
        work = self._open(top_n=top_n, raw_scores=raw_scores, tenant=tenant, weight=weight, priority=priority, docs=prepared.n_docs)
        with self._cv:
            self._add(work, prepared, np.arange(prepared.n_docs))
        try:
            done = await self._wait(work, timeout_s, disconnected)
        except BaseException:
            self.cancel(work)
            raise
        done.tokens, done.items = prepared.tokens, prepared.n_items  # as rerank reports them
        return done

    def _open(self, *, top_n: int, raw_scores: bool, tenant: str, weight: float, priority: int, docs: int) -> Work:
        work = new_work(top_n=top_n, raw_scores=raw_scores, tenant=tenant, priority=priority, docs=docs)
        loop = asyncio.get_running_loop()
        work.loop, work.future = loop, loop.create_future()
        with self._cv:
            self._queue.push(work, weight)
        return work

    def _tokenize_slice(
        self, work: Work, query: str, documents: Sequence[str], docs: np.ndarray, kwargs: dict[str, Any],
        check: SliceCheck | None, held: Held, stream: bool,
    ) -> Prepared | None:
        """On a tokenizer thread: tokenize the documents `docs` (request-wide indices) and check them; when
        streaming, queue them at once. None when the request was settled (cancelled, failed) before this
        slice was done."""
        if work.state != "queued":
            return None
        prepared = self.backend.prepare(query, [documents[i] for i in docs.tolist()], **kwargs)
        with self._cv:
            work.tokenized_items += prepared.n_items
            chunks = work.tokenized_items
        if check is not None:
            check(prepared, docs, chunks)
        if not stream:
            return prepared
        with self._cv:
            self._reserved.consume(held, len(docs) / max(len(documents), 1))
            if work.state != "queued":
                return None
            self._add(work, prepared, docs)
        return prepared

    def _add(self, work: Work, prepared: Prepared, docs: np.ndarray) -> None:
        """Queue a slice of a request (lock held); the slice that brings its last documents seals it."""
        if not work.slices:
            work.enqueued_at = time.perf_counter()  # queue time counts from here, not from tokenizing
        part = work.add(prepared, docs)
        if is_small(work, self.token_budget):
            self._search_at = time.monotonic()
        self._queue.added(work, part)
        self._cv.notify_all()  # every idle stream: a big request has batches for all of them

    async def _wait(self, work: Work, timeout_s: float | None, disconnected: asyncio.Future | None) -> Completed:
        waiter = work.future
        try:
            if disconnected is None:
                async with asyncio.timeout(timeout_s):
                    return await waiter
            done, _ = await asyncio.wait({waiter, disconnected}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                return waiter.result()
            if disconnected in done:
                raise ClientClosedRequest(f"client disconnected; its pairs for model {self.name!r} were dropped")
            raise TimeoutError
        except TimeoutError:
            self.cancel(work)
            raise Timeout(f"request to model {self.name!r} did not finish within {timeout_s:g} s") from None

    def _reserve(self, pairs: int, tokens: int) -> Held:
        with self._cv:
            return self._reserved.add(pairs, tokens)

    def _release(self, held: Held) -> None:
        with self._cv:
            self._reserved.release(held)

    def cancel(self, work: Work) -> None:
        with self._cv:
            if not work.settle("cancelled"):
                return
            self._drop(work)
        if self.metrics:
            self.metrics.cancelled.labels(self.name).inc()

    def _drop(self, work: Work) -> None:
        """Remove a settled request's pairs from the queue and the window (lock held)."""
        self._queue.remove(work)
        self._window.drop_work(work)
        work.scored = []

    def close(self) -> None:
        self._stopping = True  # not running from here on; the streams stop at their next take

        def wake() -> None:
            with self._cv:
                self._cv.notify_all()

        self._streams.stop(wake)
        self._lanes.close()

    # -- warm-up: the budget is proven at start, not in production ---------------------------------------
    def warmup(self, length: int) -> dict[str, Any]:
        """One batch of mixed lengths at the full token budget (engine.warmup), run in an inference thread.
        Returns pairs, length, seconds, peak_bytes, activation_bytes (0 on a CPU, memory_measured False),
        workspace_bytes, padded_tokens, real_tokens, shapes, and on a GPU tokens_per_s with the batch it was
        timed on (rate_tokens, rate_seconds: the first batch the device's time is learnt from). Raises
        BudgetDoesNotHold on OOM."""
        shapes = warmup_shapes(
            length, budget=self.max_batch_tokens, max_batch_size=self.max_batch_size, packed=not self.backend.is_padded,
            width_of=self.backend.padded_width if self.backend.is_padded else int,
        )

        timed = device_timed(self.backend)

        def measure() -> dict[str, Any]:
            out = run_warmup(
                self.backend, self.runner.forward_rows, shapes, budget=self.max_batch_tokens, workspace_bytes=self._workspace_bytes
            )
            if timed:
                # The first measure of the device's time (engine.batch_time), which bounds batches by time
                # until batches refine it: a full batch of typical pairs timed after an untimed run. The
                # warm-up's own first batch is no measure: it loads the kernels and starts cuBLAS, which a
                # first run of a process pays.
                lengths = rate_shape(self.max_batch_tokens, length)[: self.max_batch_size]
                rate = run_rate(self.backend, self.runner.forward_rows, lengths)
                out |= {"tokens_per_s": rate["tokens_per_s"], "rate_tokens": rate["tokens"], "rate_seconds": rate["seconds"]}
            return out

        result = self.call_in_stream(measure)
        self._workspace_bytes = self._workspace_bytes or result["workspace_bytes"]
        if timed:
            self._observed(result["rate_tokens"], result["rate_seconds"])
        return result

    def measure_rate(self, budget: int, length: int, max_pairs: int | None = None) -> dict[str, Any]:
        """Real tokens/s and peak memory of one full batch of typical pairs at `budget` tokens (at most
        `max_pairs` of them), in an inference thread (engine.warmup.run_rate)."""
        lengths = rate_shape(budget, length)[:max_pairs]
        return self.call_in_stream(lambda: run_rate(self.backend, self.runner.forward_rows, lengths))

    def measure_ladder(self, rungs: list[int], length: int, max_pairs: int | None = None) -> list[dict[str, Any]]:
        """Each rung's max_batch_tokens, tokens_per_s and peak_bytes, climbing while throughput still gains
        (core.budgets.climbing), and stopping below a rung that runs out of memory or whose batch takes over
        LADDER_MAX_BATCH_S (a search would wait for such a batch in flight, so it is no budget to choose;
        the first rung stands whatever its time): what a GPU budget at the knee is chosen from. A batch
        holds at most `max_pairs` pairs (the registry's max_batch_size, which bounds every batch the model
        runs): a rung that would need more measures the batch production would run."""
        out: list[dict[str, Any]] = []
        for tokens in rungs:
            try:
                rate = self.measure_rate(tokens, length, max_pairs)
            except torch.OutOfMemoryError:
                break  # the memory model was optimistic past here: the rungs below stand
            finally:
                free_cached(self.backend.device)
            if out and rate["seconds"] > LADDER_MAX_BATCH_S:
                break
            out.append({"max_batch_tokens": tokens, "tokens_per_s": round(rate["tokens_per_s"]), "peak_bytes": rate["peak_bytes"]})
            if not climbing([r["tokens_per_s"] for r in out]) or rate["seconds"] > LADDER_MAX_BATCH_S:
                break
        return out

    def call_in_stream(self, fn: Callable[[], Any], timeout_s: float | None = 600) -> Any:
        """Run fn in an inference thread, between batches (blocking; not from the event loop)."""
        control = _Control(fn, concurrent.futures.Future())
        with self._cv:
            self._control.append(control)
            self._cv.notify()
        return control.future.result(timeout_s)

    # -- the inference streams' side ------------------------------------------------------------------------
    def _next_job(self) -> Plan | _Control | None:
        """Block until there is work; return the next batch or control call (None when stopping)."""
        with self._cv:
            while True:
                if self._stopping:
                    return None
                if self._control:
                    return self._control.pop(0)
                clock = StepClock("build")
                plan = self._build_batch()
                if plan is not None:
                    plan.clock = clock
                    return plan
                self._cv.wait()

    def _build_batch(self) -> Plan | None:
        """The next batch from the window, after topping the window up from the queue (lock held)."""
        budget = self.token_budget
        window = self._window
        runs = self._queue.pull_newcomers(budget // SMALL_SHARE, budget)
        want = WINDOW_BATCHES * budget - window.tokens
        if want > 0:
            runs += self._queue.pull(want)
        window.add(runs)
        if not len(window):
            return None
        searching = time.monotonic() - self._search_at < SEARCH_RECENT_S
        run_budget = bulk_run_budget(budget, searching=searching, times=self._times if device_timed(self.backend) else None)
        rows = take_batch(window, self._queue, budget, self.max_batch_size, self._cost, run_budget=run_budget)
        plan = plan_of(window, rows, 0)
        plan.cost = self._cost.of_plan(plan)
        keep = np.ones(len(window), dtype=bool)
        keep[rows] = False
        window.keep(keep)
        now = time.perf_counter()
        for work in plan.works:
            if work.started_at is None:
                work.started_at = now
        return plan

    def _taken(self, job: Plan | _Control) -> None:
        """Between taking a job and its guarded run: only the tests' "take" fault runs here, which kills
        the stream (the supervisor's path)."""
        if self.runner.step_hook is not None and not isinstance(job, _Control):
            self.runner.step_hook("take", job)

    def _run_job(self, job: Plan | _Control) -> None:
        if isinstance(job, _Control):
            self._run_control(job)
        else:
            self.runner.run(job)
        # A failed job raises past this; the next one marks the engine busy again.
        HEAP.worked()

    @staticmethod
    def _run_control(job: _Control) -> None:
        try:
            job.future.set_result(job.fn())
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            # The caller holds the exception (through the future) past its `except`: cleared frames keep
            # a failed warm-up's tensors (an OOM rung's) from outliving it until the next collection.
            traceback.clear_frames(exc.__traceback__)
            job.future.set_exception(exc)

    def _fail_job(self, job: Plan | _Control, message: str) -> None:
        if isinstance(job, _Control):
            if not job.future.done():
                job.future.set_exception(RuntimeError(message))
            return
        self._fail_works(job.works, message, answered_too=True)

    def _fail_works(self, works: list[Work], message: str, answered_too: bool = False) -> None:
        """Fail requests: their pairs leave the queue. With answered_too, also those a failed step had
        settled but not yet answered (a failure while pooling)."""
        to_tell = []
        with self._cv:
            for work in works:
                if work.settle("failed"):
                    self._drop(work)
                    to_tell.append(work)
                elif answered_too and work.state == "done" and not work.delivered:
                    to_tell.append(work)
        deliver([(work, None, InferenceFailed(message)) for work in to_tell])

    def _lower_budget(self, width: int, cost: int) -> None:
        """After an OOM: what did not fit (its cost against the budget) lowers the budget for a while; new
        batches are built under it."""
        self.oom_recoveries += 1
        if self.metrics:
            self.metrics.oom_recoveries.labels(self.name).inc()
        self._token_cap = max(width, min(self._token_cap, cost // 2))
        self._cap_until = time.monotonic() + OOM_COOLDOWN_S

    def _observed(self, tokens: int, seconds: float) -> None:
        with self._cv:
            self._times.observe(tokens, seconds)

    def batch_time(self) -> dict[str, float | int] | None:
        """What a batch costs the device as learnt so far (floor_ms, tokens_per_s, batches), or None before
        any batch: on a GPU, CUDA-event time; on a CPU, the host's clock around the forward."""
        with self._cv:
            return self._times.describe() if self._times.batches else None

    def _health(self, reason: str | None) -> None:
        self.unavailable_reason = reason
        if self.on_health is not None:
            self.on_health(reason)
