"""Start-time fair queueing on tokens, two levels deep: across tenants (weights = tenant priority), and
across the requests of one tenant (equal shares).

Without the second level, every client of an open gateway is one tenant and a 3-document search waits
for a 2,000-document request that arrived first (33 s). With it, a new request starts at its tenant's
current virtual time, so its pairs are pulled (and anchor a batch) ahead of the bulk request's backlog.

A request's pairs arrive in slices (engine.work); a request with no pairs left to pull leaves its tenant's
queue and comes back when its next slice is added, at no earlier virtual time than the one in service
(idleness banks no credit). Pulls hand out runs of a slice's shortest pending pairs as arrays.

`priority` (the request field) still orders strictly inside a tenant: a lower value is served first.
Not thread-safe: the Scheduler holds its lock around every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.work import Slice, Work

# Longest run taken from one request before the next request is picked, in pairs (the token limit is
# the pull's budget / 4); bounds the arrays one pull step works on.
MAX_RUN_PAIRS = 4096


@dataclass(slots=True)
class Run:
    """Pairs pulled from one slice: their indices in the slice, lengths and fair-queue tags."""

    work: Work
    part: Slice
    items: np.ndarray  # int64
    lengths: np.ndarray  # int32
    tags: np.ndarray  # float64: virtual start times across tenants
    rtags: np.ndarray  # float64: virtual start times across the requests of the tenant


class _TenantQueue:
    __slots__ = ("works", "weight", "vtime", "inner_vnow")

    def __init__(self, weight: float) -> None:
        self.works: list[Work] = []  # requests with pairs not yet pulled
        self.weight = weight
        self.vtime = 0.0  # this tenant's virtual time among tenants
        self.inner_vnow = 0.0  # virtual time of its request in service, among its requests


class FairQueue:
    def __init__(self) -> None:
        self.tenants: dict[str, _TenantQueue] = {}
        self.pairs = 0
        self.tokens = 0
        # Virtual time of the work in service. Pulls run ahead of it, so a newly active tenant starts here,
        # not where the busiest tenant's pulls have got to: otherwise it would queue behind everything
        # already pulled into the window.
        self.vnow = 0.0

    def push(self, work: Work, weight: float) -> None:
        """A new request (before its first slice): its tenant's weight and its start in virtual time."""
        tq = self.tenants.get(work.tenant)
        if tq is None:
            tq = self.tenants[work.tenant] = _TenantQueue(weight)
        tq.weight = weight
        work.vtime = tq.inner_vnow

    def added(self, work: Work, part: Slice) -> None:
        """A slice of `work` was added: its pairs can be pulled."""
        self.pairs += part.pending
        self.tokens += int(part.prepared.lengths.sum())
        if not work.active and part.pending:
            tq = self.tenants[work.tenant]
            if not tq.works:
                # An idle tenant starts at the current virtual time: idleness banks no credit.
                tq.vtime = max(tq.vtime, self.vnow)
            # The same inside the tenant: a request coming back starts no earlier than the one in service.
            work.vtime = max(work.vtime, tq.inner_vnow)
            tq.works.append(work)
            work.active = True

    def pull(self, budget_tokens: int) -> list[Run]:
        """Take pairs in fair order until about budget_tokens real tokens are taken or the queue is empty."""
        taken: list[Run] = []
        spent = 0
        run_limit = max(1, budget_tokens // 4)
        while spent < budget_tokens:
            active = [(tq.vtime, name) for name, tq in self.tenants.items() if tq.works]
            if not active:
                break
            _, name = min(active)
            tq = self.tenants[name]
            top = min(w.priority for w in tq.works)
            work = min((w for w in tq.works if w.priority == top), key=lambda w: (w.vtime, w.seq))
            # Serve this request a small run of its shortest pending pairs (from the slice whose next pair is
            # shortest: slices arrive one by one, each sorted), then pick again.
            part = min((s for s in work.slices if s.pending), key=lambda s: s.prepared.lengths[s.order[s.cursor]])
            # Pairs are shortest first: a run holds at most run_limit // (the next pair's length) + 1 of them.
            shortest = max(1, int(part.prepared.lengths[part.order[part.cursor]]))
            items = part.order[part.cursor : part.cursor + min(MAX_RUN_PAIRS, run_limit // shortest + 1)]
            lengths = part.prepared.lengths[items]
            before = np.cumsum(lengths, dtype=np.int64) - lengths  # tokens of the run before each pair
            count = max(1, int(np.searchsorted(before, run_limit, side="left")))
            items, lengths, before = items[:count], lengths[:count], before[:count]
            run_tokens = int(lengths.sum())
            taken.append(Run(work, part, items, lengths, tq.vtime + before / tq.weight, work.vtime + before.astype(np.float64)))
            part.cursor += count
            self.pairs -= count
            self.tokens -= run_tokens
            spent += run_tokens
            tq.vtime += run_tokens / tq.weight
            work.vtime += run_tokens
            if not work.pending:
                self._leave(tq, work)
        return taken

    def pull_newcomers(self, max_request_tokens: int, budget_tokens: int) -> list[Run]:
        """Take every pair of small requests not pulled yet (at most max_request_tokens each, budget_tokens in
        all), even when the window is full: pulls run several batches ahead, and without this a search that
        arrives behind them waits for the window to drain before its fair tag can count."""
        taken: list[Run] = []
        spent = 0
        for tq in self.tenants.values():
            if not tq.works:
                continue
            top = min(w.priority for w in tq.works)  # never ahead of a more urgent request of its tenant
            fresh = [
                w for w in tq.works
                if w.sealed and w.priority == top and w.total_tokens <= max_request_tokens and all(s.cursor == 0 for s in w.slices)
            ]
            for work in fresh:
                if spent + work.total_tokens > budget_tokens:
                    return taken
                run = 0
                for part in work.slices:
                    lengths = part.prepared.lengths[part.order]
                    before = run + np.cumsum(lengths, dtype=np.int64) - lengths
                    taken.append(Run(work, part, part.order, lengths, tq.vtime + before / tq.weight, work.vtime + before.astype(np.float64)))
                    run += int(lengths.sum())
                    self.pairs -= part.pending
                    part.cursor = len(part.order)
                self.tokens -= run
                spent += run
                tq.vtime += run / tq.weight
                work.vtime += run
                self._leave(tq, work)
        return taken

    def served(self, tenant: str, tag: float | None, rtag: float) -> None:
        """A batch of `tenant` served pairs up to request tag `rtag` (and tenant tag `tag`, if it served the
        lead): virtual time moves on."""
        if tag is not None:
            self.vnow = max(self.vnow, tag)
        tq = self.tenants.get(tenant)
        if tq is not None:
            tq.inner_vnow = max(tq.inner_vnow, rtag)

    def remove(self, work: Work) -> None:
        """Drop a request's pairs not yet pulled (cancelled or failed)."""
        for part in work.slices:
            if part.pending:
                self.pairs -= part.pending
                self.tokens -= part.pending_tokens()
                part.cursor = len(part.order)
        tq = self.tenants.get(work.tenant)
        if tq is not None and work.active:
            self._leave(tq, work)

    @staticmethod
    def _leave(tq: _TenantQueue, work: Work) -> None:
        tq.works.remove(work)
        work.active = False
