"""Tokenizer lanes: a request is tokenized on a thread pool sized to its kind, with a bounded queue.

Requests with at most SMALL_REQUEST_DOCS documents go to a lane of their own, so a 20-document search
never waits behind a 10,000-document tokenization (seconds on a CPU). Big requests are tokenized at the
lowest CPU priority: they use the cores the inference threads and small requests leave idle, and in
consecutive slices of their documents, several per thread of the bulk lane, so a big request on an idle server
is tokenized on every core, each slice joining the queue as soon as it is ready (engine.scheduler). Each
lane refuses work (429) past a bound of waiting requests, so a burst cannot queue unbounded text in memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from typing import Callable, TypeVar

from core.errors import TooManyRequests
from core.host import BULK_TOKENIZE_NICE, cpu_cores, lower_cpu_priority

T = TypeVar("T")

# Tokenizers' Rust batch encoder shares one global thread pool that runs jobs in order: a 20-document
# request's encode would wait for another tenant's 10,000-document encode to finish. Requests already run on
# threads of their own, so the library's inner parallelism only costs fairness here.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_REQUEST_DOCS = 256
# Requests waiting or running per lane before new ones are refused.
MAX_PENDING_SMALL = 256
MAX_PENDING_BULK_PER_THREAD = 4
# A big request is cut into slices of MIN..MAX_SLICE_DOCS documents, about SLICES_PER_THREAD per thread:
# each slice is queued as soon as it is tokenized, so the device starts on the first ones while the rest
# tokenize (1,000 documents on 8 threads: 32-document slices, the first queued after ~1/30 of the
# tokenizing), and slices stay batch-encoder calls of some size.
MIN_SLICE_DOCS = 32
MAX_SLICE_DOCS = 128
SLICES_PER_THREAD = 4
# Bulk-lane threads: one per core, at least two (one big request does not hold the whole lane), at most
# eight (a cap on threads per loaded model, not a measured optimum: this was measured on two cores only).
# Tokenizing 1,000 documents takes ~0.3 s on one core, which a GPU's inference stream would wait out.
MAX_BULK_THREADS = 8


# Small-lane threads: 16 clients' 20-document requests would otherwise queue on one thread: at ~0.23 ms a
# document (2-core Xeon), one thread tokenizes ~4,000 pairs/s, half of what one GPU scores.
MAX_SMALL_THREADS = 4


def default_bulk_threads() -> int:
    return max(2, min(MAX_BULK_THREADS, cpu_cores()))


def default_small_threads(forward_on_host: bool = True) -> int:
    """Where the model's forward runs on the host's cores (a CPU), one thread up to 7 cores, a quarter of
    the cores past that: the forward needs them, and a second thread gained nothing there (16 x 20 documents
    at 0.95x, bench.host_path, 2026-12-05). Before a GPU the cores are the host's alone: half of them, two
    at least (where there are two). Before bench.fast_device's simulated device (packed, 1,150,000 tokens/s,
    2-core AMD EPYC) two threads ran 16 x 20 documents at 1.20x one (1.10-1.38, 8 alternating rounds):
    two requests reached each batch instead of one, p99/p50 1.9 against 1.3."""
    cores = cpu_cores()
    if forward_on_host:
        return max(1, min(MAX_SMALL_THREADS, cores // 4))
    return max(min(2, cores), min(MAX_SMALL_THREADS, cores // 2))


class _Lane:
    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor, threads: int, bound: int, sliced: bool = True) -> None:
        self.pool = pool
        self.threads = threads
        self.bound = bound
        self.sliced = sliced  # big requests are cut into slices; a small one is tokenized whole
        self.pending = 0

    def slices(self, n_docs: int) -> list[tuple[int, int]]:
        """Consecutive [start, stop) slices of the documents: one for a request the small lane takes, else
        slices of MIN..MAX_SLICE_DOCS, about SLICES_PER_THREAD per thread."""
        if not self.sliced or self.threads == 1:
            return [(0, n_docs)]
        size = max(MIN_SLICE_DOCS, min(MAX_SLICE_DOCS, -(-n_docs // (self.threads * SLICES_PER_THREAD))))
        count = max(1, -(-n_docs // size))
        cuts = [n_docs * k // count for k in range(count + 1)]
        return list(zip(cuts, cuts[1:]))


class TokenizerLanes:
    def __init__(self, name: str, bulk_threads: int | None = None, small_threads: int | None = None) -> None:
        bulk_threads = bulk_threads or default_bulk_threads()
        self.name = name
        small_threads = small_threads or default_small_threads()
        self.small = _Lane(
            concurrent.futures.ThreadPoolExecutor(small_threads, thread_name_prefix=f"tok-small-{name}"), small_threads,
            MAX_PENDING_SMALL, sliced=False,
        )
        self.bulk = _Lane(
            concurrent.futures.ThreadPoolExecutor(bulk_threads, thread_name_prefix=f"tok-{name}", initializer=lower_cpu_priority, initargs=(BULK_TOKENIZE_NICE,)),
            bulk_threads,
            MAX_PENDING_BULK_PER_THREAD * bulk_threads,
        )

    async def run(self, n_docs: int, fn: Callable[[int, int], T]) -> list[T]:
        """fn(start, stop) for consecutive slices of a request's n_docs documents, run on the request's lane
        (one slice unless it is a big request and the bulk lane has several threads); the results in
        document order. The request counts once towards the lane's bound, whatever its slices."""
        lane = self.small if n_docs <= SMALL_REQUEST_DOCS else self.bulk
        if lane.pending >= lane.bound:
            raise TooManyRequests(
                f"model {self.name!r} is overloaded ({lane.pending} requests waiting to be tokenized); retry later",
                retry_after_s=1.0,
            )
        lane.pending += 1
        loop = asyncio.get_running_loop()
        slices = lane.slices(n_docs)
        try:
            if len(slices) == 1:  # every search: one executor future, no gathering around it
                return [await loop.run_in_executor(lane.pool, fn, *slices[0])]
            return list(await asyncio.gather(*(loop.run_in_executor(lane.pool, fn, a, b) for a, b in slices)))
        finally:
            lane.pending -= 1

    def close(self) -> None:
        for lane in (self.small, self.bulk):
            lane.pool.shutdown(wait=False, cancel_futures=True)
