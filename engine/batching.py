"""One batch from the window of queued pairs.

Pairs from all concurrent requests share batches bounded by padded tokens (longest x count) and a pair
count. Inside a window of queued pairs a few batches deep, a batch is built around the pair with the
smallest fair-queue tag (the anchor) from the pairs nearest it in length: padding stays low and no long
document waits forever.

A small request is kept whole (one batch, not spread over several batches of someone else's work) when
other requests share the window: always across tenants when it fits a batch (other tenants' pairs fill the
rest), and inside one tenant when it fills at most a quarter of a batch (only other small requests fill
the rest). A larger request of the only tenant keeps the plain length run, which
pads less (16 clients x 20 documents: 92% against 86% when kept whole).
"""

from __future__ import annotations

from engine.fair_queue import FairQueue
from engine.work import Slot

# A request whose padded size is at most this share of the token budget is "small" inside a tenant.
SMALL_SHARE = 4


def take_batch(window: list[Slot], queue: FairQueue, budget: int, max_batch_size: int) -> tuple[list[Slot], list[Slot]]:
    """(batch, rest of the window). `window` must not be empty."""
    lead = min(window, key=lambda s: (s.tag, s.seq))
    tenant = lead.work.tenant
    # Across tenants the tenant tag decides; inside the chosen tenant, the request tag.
    first = min((s for s in window if s.work.tenant == tenant), key=lambda s: (s.rtag, s.seq))
    batch, rest = _build(window, first, budget, max_batch_size)
    # Virtual time moves to the lead's tag only when the lead is served: when a small request of the same
    # tenant went first, a tenant arriving now must still start ahead of the lead, not tie with it.
    queue.served(tenant, lead.tag if any(s is lead for s in batch) else None, first.rtag)
    return batch, rest


def _build(window: list[Slot], first: Slot, budget: int, max_batch_size: int) -> tuple[list[Slot], list[Slot]]:
    tenant = first.work.tenant
    own = [s for s in window if s.work is first.work]
    width = max(s.length for s in own)
    padded = width * len(own)
    fits = len(own) <= max_batch_size and padded <= budget
    other_tenants = any(s.work.tenant != tenant for s in window)
    other_requests = other_tenants or any(s.work is not first.work for s in window)
    in_window: dict = {}
    for s in window:
        in_window[s.work] = in_window.get(s.work, 0) + 1

    def small(work) -> bool:
        # Small as a whole, not the last pairs of a large request: those pad less in a length run.
        return in_window[work] == work.n_items and work.total_tokens * SMALL_SHARE <= budget

    if fits and (other_tenants or (other_requests and small(first.work))):
        room = min(max_batch_size, budget // width) - len(own)
        filler = [s for s in window if s.work is not first.work and s.length <= width]
        if not other_tenants:
            # Inside a tenant only other small requests ride along: a bulk request's pairs would make a
            # 3-document search's batch a full one, and its latency that of the bulk request's batches.
            filler = [s for s in filler if small(s.work)]
        filler.sort(key=lambda s: (s.tag, s.seq))
        batch = own + filler[: max(room, 0)]
        taken = {id(s) for s in batch}
        return batch, [s for s in window if id(s) not in taken]
    ordered = sorted(window, key=lambda s: s.length)
    anchor = next(i for i, s in enumerate(ordered) if s is first)
    lo = hi = anchor  # inclusive bounds of the run in length order; ordered[hi] is its widest pair
    # Grow the run by whichever neighbour is nearer in length, while the padded size fits the budget.
    while hi - lo + 1 < max_batch_size:
        count = hi - lo + 2
        options = []
        if hi + 1 < len(ordered) and ordered[hi + 1].length * count <= budget:
            options.append((ordered[hi + 1].length - ordered[hi].length, 1))
        if lo > 0 and ordered[hi].length * count <= budget:
            options.append((ordered[hi].length - ordered[lo - 1].length, -1))
        if not options:
            break
        if min(options)[1] == 1:
            hi += 1
        else:
            lo -= 1
    return ordered[lo : hi + 1], ordered[:lo] + ordered[hi + 1 :]
