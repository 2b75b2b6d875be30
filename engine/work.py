"""A request inside the engine, its queued pairs, and its answer.

A Work is settled exactly once, by whoever gets there first under the scheduler's lock: the stream that
scores its last pair, a failure, or a cancellation (timeout, disconnect, task cancelled). The answer goes
to the event loop with `call_soon_threadsafe` onto an asyncio future the loop owns, so a future the loop
has cancelled can never make the inference thread raise.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from backends.base import Prepared

WorkState = Literal["queued", "done", "failed", "cancelled"]


@dataclass(slots=True)
class Completed:
    indices: list[int]
    scores: list[float]
    queue_s: float
    inference_s: float


@dataclass(eq=False)
class Work:
    """One request inside the scheduler."""

    prepared: Prepared
    top_n: int
    raw_scores: bool
    tenant: str
    priority: int
    lengths: array.array  # tokens of each item (int32)
    order: array.array  # item indices, shortest first
    total_tokens: int  # sum of lengths
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    seq: int = 0  # arrival order, to break ties in the fair queue
    cursor: int = 0  # next position in `order` not yet pulled into the window
    vtime: float = 0.0  # virtual time inside its tenant (fair share per request)
    done_items: int = 0
    # Scored parts, (item indices, rows of the batch, the batch's scores on the device); pooled once the
    # last pair is scored.
    parts: list[tuple[list[int], list[int], torch.Tensor]] = field(default_factory=list)
    state: WorkState = "queued"
    delivered: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    inference_s: float = 0.0

    @property
    def n_items(self) -> int:
        return len(self.lengths)


    def pending_tokens(self) -> int:
        return sum(self.lengths[self.order[k]] for k in range(self.cursor, self.n_items))

    def pending_in_queue(self) -> int:
        return self.n_items - self.cursor

    # -- settling: call with the scheduler's lock held, then `deliver` outside it --------------------------
    def settle(self, state: WorkState) -> bool:
        """Claim the right to answer. False when another path already answered or cancelled it."""
        if self.state != "queued":
            return False
        self.state = state
        return True

    def deliver(self, result: Completed | None = None, error: BaseException | None = None) -> None:
        """Hand the answer to the event loop (thread-safe; a closed loop or a cancelled future is fine).
        Only the path that settled the work calls this; later calls are ignored."""
        if self.delivered or self.future is None or self.loop is None:
            return
        self.delivered = True
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future, result, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _resolve(future: asyncio.Future, result: Completed | None, error: BaseException | None) -> None:
    if future.done():  # cancelled by the loop (timeout, disconnect) before the answer arrived
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass(slots=True)
class Slot:
    """A queued pair: (work, item index), with its length cached for batching."""

    work: Work
    item: int
    length: int
    seq: int  # pull order, to break ties between equal tags
    # Virtual start times: `tag` across tenants, `rtag` across the requests of one tenant.
    tag: float = 0.0
    rtag: float = 0.0


_arrivals = itertools.count()


def new_work(prepared: Prepared, *, top_n: int, raw_scores: bool, tenant: str, priority: int) -> Work:
    lengths = array.array("i", (len(item.input_ids) for item in prepared.items))
    order = array.array("i", sorted(range(len(lengths)), key=lengths.__getitem__))
    return Work(
        prepared=prepared, top_n=top_n, raw_scores=raw_scores, tenant=tenant, priority=priority,
        lengths=lengths, order=order, total_tokens=sum(lengths), seq=next(_arrivals),
    )


def compact(prepared: Prepared) -> Prepared:
    """Store a prepared request's token ids as views into one int32 array (type ids as int8).

    A Python list of ints costs 8 bytes a token for the pointer plus 28 for each int object above 256, so a
    queue of 8 M tokens held ~300 MB of lists; int32 holds the same in 32 MB. Backends keep producing lists
    (what tokenizers return); the engine compacts them once, on the tokenizer thread, before queueing.
    """
    items = prepared.items
    if not items or isinstance(items[0].input_ids, np.ndarray):
        return prepared
    lengths = np.fromiter((len(it.input_ids) for it in items), dtype=np.int64, count=len(items))
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    flat = np.fromiter(itertools.chain.from_iterable(it.input_ids for it in items), dtype=np.int32, count=total)
    has_types = items[0].token_type_ids is not None
    types = (
        np.fromiter(itertools.chain.from_iterable(it.token_type_ids for it in items), dtype=np.int8, count=total)
        if has_types
        else None
    )
    for k, it in enumerate(items):
        a, b = offsets[k], offsets[k + 1]
        it.input_ids = flat[a:b]
        if types is not None:
            it.token_type_ids = types[a:b]
    return prepared
