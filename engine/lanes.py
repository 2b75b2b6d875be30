"""Tokenizer lanes: a request is tokenized on a thread pool sized to its kind, with a bounded queue.

Requests with at most SMALL_REQUEST_DOCS documents go to a lane of their own, so a 20-document search
never waits behind a 10,000-document tokenization (seconds on a CPU). Big requests are tokenized at the
lowest CPU priority: they use the cores the inference threads and small requests leave idle. Each lane
refuses work (429) past a bound of waiting requests, so a burst cannot queue unbounded text in memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
from typing import Callable, TypeVar

from core.errors import TooManyRequests

T = TypeVar("T")

# Tokenizers' Rust batch encoder shares one global thread pool that runs jobs in order: a 20-document
# request's encode would wait for another tenant's 10,000-document encode to finish. Requests already run on
# threads of their own, so the library's inner parallelism only costs fairness here.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_REQUEST_DOCS = 256
# Requests waiting or running per lane before new ones are refused.
MAX_PENDING_SMALL = 256
MAX_PENDING_BULK_PER_THREAD = 4


def _bulk_thread_priority() -> None:
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


class _Lane:
    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor, bound: int) -> None:
        self.pool = pool
        self.bound = bound
        self.pending = 0


class TokenizerLanes:
    def __init__(self, name: str, bulk_threads: int = 2) -> None:
        self.name = name
        self.small = _Lane(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"tok-small-{name}"), MAX_PENDING_SMALL)
        self.bulk = _Lane(
            concurrent.futures.ThreadPoolExecutor(bulk_threads, thread_name_prefix=f"tok-{name}", initializer=_bulk_thread_priority),
            MAX_PENDING_BULK_PER_THREAD * bulk_threads,
        )

    async def run(self, n_docs: int, fn: Callable[[], T]) -> T:
        lane = self.small if n_docs <= SMALL_REQUEST_DOCS else self.bulk
        if lane.pending >= lane.bound:
            raise TooManyRequests(
                f"model {self.name!r} is overloaded ({lane.pending} requests waiting to be tokenized); retry later",
                retry_after_s=1.0,
            )
        lane.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(lane.pool, fn)
        finally:
            lane.pending -= 1

    def close(self) -> None:
        for lane in (self.small, self.bulk):
            lane.pool.shutdown(wait=False, cancel_futures=True)
