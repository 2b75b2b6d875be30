"""Start-time fair queueing on tokens, two levels deep: across tenants (weights = tenant priority), and
across the requests of one tenant (equal shares).

Without the second level, every client of an open gateway is one tenant and a 3-document search waits
for a 2,000-document request that arrived first (33 s). With it, a new request starts at its tenant's
current virtual time, so its pairs are pulled (and anchor a batch) ahead of the bulk request's backlog.

`priority` (the request field) still orders strictly inside a tenant: a lower value is served first.
Not thread-safe: the Scheduler holds its lock around every call.
"""

from __future__ import annotations

from engine.work import Work


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
        # Virtual time of the work in service (the tag of the last batch's anchor). Pulls run ahead of it,
        # so a newly active tenant starts here, not where the busiest tenant's pulls have got to:
        # otherwise it would queue behind everything already pulled into the window.
        self.vnow = 0.0

    def push(self, work: Work, weight: float) -> None:
        tq = self.tenants.get(work.tenant)
        if tq is None:
            tq = self.tenants[work.tenant] = _TenantQueue(weight)
        tq.weight = weight
        if not tq.works:
            # An idle tenant starts at the current virtual time: idleness banks no credit.
            tq.vtime = max(tq.vtime, self.vnow)
        # The same inside the tenant: a new request starts at the virtual time of the one in service.
        work.vtime = tq.inner_vnow
        tq.works.append(work)
        self.pairs += work.n_items
        self.tokens += work.total_tokens

    def pull(self, budget_tokens: int) -> list[tuple[Work, int, float, float]]:
        """Take pairs in fair order until about budget_tokens real tokens are taken or the queue is empty.
        Returns (work, item, tenant tag, request tag) per pair."""
        taken: list[tuple[Work, int, float, float]] = []
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
            # Serve this request a small run of its shortest pending pairs, then pick again.
            run_tokens = 0
            while work.cursor < work.n_items and run_tokens < run_limit:
                item = work.order[work.cursor]
                work.cursor += 1
                length = work.lengths[item]
                taken.append((work, item, tq.vtime + run_tokens / tq.weight, work.vtime + run_tokens))
                run_tokens += length
                self.pairs -= 1
                self.tokens -= length
            spent += run_tokens
            tq.vtime += run_tokens / tq.weight
            work.vtime += run_tokens
            if work.cursor >= work.n_items:
                tq.works.remove(work)
        return taken

    def pull_newcomers(self, max_request_tokens: int, budget_tokens: int) -> list[tuple[Work, int, float, float]]:
        """Take every pair of small requests not pulled yet (at most max_request_tokens each, budget_tokens in
        all), even when the window is full: pulls run several batches ahead, and without this a search that
        arrives behind them waits for the window to drain before its fair tag can count."""
        taken: list[tuple[Work, int, float, float]] = []
        spent = 0
        for tq in self.tenants.values():
            if not tq.works:
                continue
            top = min(w.priority for w in tq.works)  # never ahead of a more urgent request of its tenant
            for work in [w for w in tq.works if w.cursor == 0 and w.priority == top and w.total_tokens <= max_request_tokens]:
                if spent + work.total_tokens > budget_tokens:
                    return taken
                run = 0
                for k in range(work.n_items):
                    item = work.order[k]
                    taken.append((work, item, tq.vtime + run / tq.weight, work.vtime + run))
                    run += work.lengths[item]
                work.cursor = work.n_items
                self.pairs -= work.n_items
                self.tokens -= run
                spent += run
                tq.vtime += run / tq.weight
                work.vtime += run
                tq.works.remove(work)
        return taken

    def served(self, tenant: str, tag: float | None, rtag: float) -> None:
        """A batch of `tenant` anchored at request tag `rtag` is in service (`tag`: the tenant tag it
        served, if any): virtual time moves on."""
        if tag is not None:
            self.vnow = max(self.vnow, tag)
        tq = self.tenants.get(tenant)
        if tq is not None:
            tq.inner_vnow = max(tq.inner_vnow, rtag)

    def remove(self, work: Work) -> None:
        """Drop a request's pairs not yet pulled (cancelled or failed)."""
        tq = self.tenants.get(work.tenant)
        if tq is not None and work in tq.works:
            tq.works.remove(work)
            self.pairs -= work.pending_in_queue()
            self.tokens -= work.pending_tokens()
            work.cursor = work.n_items
