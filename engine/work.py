"""A request inside the engine, and its answer.

A request arrives in slices: a big request's documents are tokenized in consecutive slices on several
threads, and each slice is queued as soon as it is ready (`Work.add`), so the device starts on the first
slices while the rest are tokenizing. A slice holds its pairs as flat arrays (backends.base.Prepared) and
the order in which the queue takes them (shortest first); nothing in the engine is an object per pair.
The request is complete once it is sealed (every slice added) and every pair is scored.

A Work is settled exactly once, by whoever gets there first under the scheduler's lock: the stream that
scores its last pair, a failure, or a cancellation (timeout, disconnect, task cancelled). The answer goes
to the event loop with `call_soon_threadsafe` onto an asyncio future the loop owns, so a future the loop
has cancelled can never make the inference thread raise.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from backends.base import Prepared, to_device
from core.handoff import settle_from_thread

WorkState = Literal["queued", "done", "failed", "cancelled"]


@dataclass(slots=True)
class Completed:
    indices: list[int]
    scores: list[float]
    queue_s: float
    inference_s: float
    tokenize_s: float = 0.0
    # What the request is metered for: its tokens as the backend counts them, and its pairs (chunks).
    tokens: int = 0
    items: int = 0


@dataclass(eq=False, slots=True)
class Slice:
    """A slice of a request's documents, tokenized: its pairs and the queue's cursor in them."""

    prepared: Prepared
    item_base: int  # the request-wide number of its first pair
    docs: np.ndarray  # the request-wide index of each of its documents (int64)
    order: np.ndarray  # its pairs, shortest first (int64)
    cursor: int = 0  # pairs of `order` already taken by the queue

    @property
    def pending(self) -> int:
        return len(self.order) - self.cursor

    def pending_tokens(self) -> int:
        return int(self.prepared.lengths[self.order[self.cursor :]].sum())


@dataclass(eq=False)
class Work:
    """One request inside the scheduler."""

    top_n: int
    raw_scores: bool
    tenant: str
    priority: int
    seq: int = 0  # arrival order, to break ties in the fair queue
    expected_docs: int = 0  # documents of the request; it is sealed once slices covering them are added
    slices: list[Slice] = field(default_factory=list)
    docs_added: int = 0
    sealed: bool = False  # every slice added: the request's size is final
    n_items: int = 0  # pairs added so far
    tokenized_items: int = 0  # pairs its slices have tokenized so far (queued or not)
    total_tokens: int = 0  # their tokens
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    vtime: float = 0.0  # virtual time inside its tenant (fair share per request)
    active: bool = False  # in its tenant's queue (has pairs the queue has not taken)
    done_items: int = 0
    # Scored parts: (slice, its pairs, their scores on the device), pooled once the last pair is scored.
    scored: list[tuple[Slice, np.ndarray, torch.Tensor]] = field(default_factory=list)
    state: WorkState = "queued"
    delivered: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    inference_s: float = 0.0

    def add(self, prepared: Prepared, docs: np.ndarray) -> Slice:
        """Append a tokenized slice (lock held); `docs`: the request-wide index of each of its documents."""
        part = Slice(prepared, self.n_items, docs, np.argsort(prepared.lengths, kind="stable"))
        self.slices.append(part)
        self.n_items += prepared.n_items
        self.total_tokens += int(prepared.lengths.sum())
        self.docs_added += prepared.n_docs
        self.sealed = self.docs_added >= self.expected_docs
        return part

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.slices)

    def pending_tokens(self) -> int:
        return sum(s.pending_tokens() for s in self.slices if s.pending)

    @property
    def complete(self) -> bool:
        return self.sealed and self.done_items == self.n_items

    # -- settling: call with the scheduler's lock held, then `deliver` outside it --------------------------
    def settle(self, state: WorkState) -> bool:
        """Claim the right to answer. False when another path already answered or cancelled it."""
        if self.state != "queued":
            return False
        self.state = state
        return True

    # -- the answer ---------------------------------------------------------------------------------------
    def raw_scores_by_doc(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(every pair's raw score, float32; the request-wide document of each pair; documents) on the
        device, from the scored parts: one index copy per part."""
        raw = torch.empty(self.n_items, device=device, dtype=torch.float32)
        for part, items, scores in self.scored:
            at = to_device(torch.from_numpy(part.item_base + items), device)
            raw.index_copy_(0, at, scores.float())
        doc_index = np.concatenate([s.docs[s.prepared.doc_index] for s in self.slices])
        return raw, to_device(torch.from_numpy(doc_index), device), self.expected_docs


Answer = tuple[Work, Completed | None, BaseException | None]


def deliver(answers: list[Answer]) -> None:
    """Hand answers to the event loops that wait for them, one call into each loop for all of its answers
    (core.handoff; a batch may finish many requests). Only the path that settled a work calls this; a work
    already delivered is skipped."""
    handed = []
    for work, result, error in answers:
        if work.delivered or work.future is None or work.loop is None:
            continue
        work.delivered = True
        handed.append((work.loop, work.future, result, error))
    settle_from_thread(handed)


_arrivals = itertools.count()


def new_work(*, top_n: int, raw_scores: bool, tenant: str, priority: int, docs: int) -> Work:
    return Work(top_n=top_n, raw_scores=raw_scores, tenant=tenant, priority=priority, seq=next(_arrivals), expected_docs=docs)
