"""One batch from the window of queued pairs (engine.window), built with array operations.

Pairs from all concurrent requests share batches bounded by a token cost and a pair count. The cost is
what the backend's forward pays: longest x count for a padded batch, the real tokens for a packed one
(`Backend.is_padded` False), and for a backend that runs a request's shared prefix once per batch group
(`Prepared.shared`, Qwen3) each group's tail x count plus its prefix once. Inside a window of queued pairs
a few batches deep, a batch is built around the pair with the smallest fair-queue tag (the anchor) from
the pairs nearest it in length: padding stays low and no long document waits forever.

A small request is kept whole (one batch, not spread over several batches of someone else's work) when
other requests share the window: always across tenants when it fits a batch (other tenants' pairs fill the
rest), and inside one tenant when it fills at most a quarter of a batch (only other small requests fill
the rest). A larger request of the only tenant keeps the plain length run, which pads less (16 clients x
20 documents: 92% against 86% when kept whole).

A batch cannot be interrupted, so a search that arrives waits for the batch in flight. While searches
keep arriving, the scheduler passes a smaller `run_budget` for length runs (a bulk request's batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from backends.base import Rows
from backends.token_arrays import gather_index
from engine.fair_queue import FairQueue
from engine.step_time import StepClock
from engine.window import Window
from engine.work import Slice, Work

# A request whose tokens are at most this share of the token budget is "small" (a search).
SMALL_SHARE = 4


@dataclass(slots=True)
class Group:
    """Rows of a batch from one slice of one request, consecutive in the batch."""

    work: Work
    part: Slice
    items: np.ndarray  # the slice's pairs, in row order


@dataclass(slots=True)
class Plan:
    """A batch to run: its rows, grouped by request slice."""

    groups: list[Group]
    lengths: np.ndarray  # tokens of each row, in row order
    cost: int  # against the token budget (padded, packed or prefix-shared, as the backend runs it)
    clock: StepClock | None = None  # the inference thread's time on this batch, from its build on

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def works(self) -> list[Work]:
        return list(dict.fromkeys(g.work for g in self.groups))

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    def rows(self) -> Rows:
        """The batch's pairs for the backend's collate: tokens gathered from each slice's arrays."""
        parts = []
        for g in self.groups:
            p = g.part.prepared
            lengths = p.lengths[g.items]
            at = gather_index(p.offsets[g.items], lengths)
            parts.append(Rows(p.ids[at], lengths, None if p.types is None else p.types[at], [p.context] * len(g.items)))
        return Rows.concat(parts)

    def split(self) -> tuple["Plan", "Plan"]:
        """Two halves (after an OOM), each grouped as before."""
        mid = len(self) // 2
        halves: tuple[list[Group], list[Group]] = ([], [])
        start = 0
        for g in self.groups:
            n = len(g.items)
            cut = min(max(mid - start, 0), n)
            if cut:
                halves[0].append(Group(g.work, g.part, g.items[:cut]))
            if cut < n:
                halves[1].append(Group(g.work, g.part, g.items[cut:]))
            start += n
        return tuple(Plan(h, np.concatenate([g.part.prepared.lengths[g.items] for g in h]), 0) for h in halves)  # type: ignore[return-value]


class BatchCost:
    """What a set of window rows (or a planned batch) costs against the token budget, as the backend's
    forward runs them."""

    def __init__(self, is_padded: bool, width: Callable[[int], int] = int, prefix_row_share: float = 0.0) -> None:
        self.is_padded = is_padded
        # A padded batch's width for its longest pair (Backend.padded_width: an exported runtime's batches
        # are rounded up to a multiple of tokens), so that a batch built under the budget runs under it.
        self.width = width
        # Rows behind a shared prefix run their own tokens against it once computed, but each row's attention
        # holds the prefix's keys and values (Backend.prefix_row_share): its tokens count this much a row.
        self.prefix_row_share = prefix_row_share

    def prefix_per_row(self, shared: np.ndarray | int) -> np.ndarray:
        """Tokens a row is charged for its group's shared prefix of `shared` tokens."""
        return np.ceil(np.asarray(shared, dtype=np.float64) * self.prefix_row_share).astype(np.int64)

    def of_plan(self, plan: Plan) -> int:
        if not self.is_padded:
            return plan.real_tokens
        shared = [g.part.prepared.shared for g in plan.groups]
        if not any(shared):
            return self.width(int(plan.lengths.max())) * len(plan)
        cost, plain = 0, []
        for g, p in zip(plan.groups, shared):
            lengths = g.part.prepared.lengths[g.items]
            if p:
                cost += (int(lengths.max()) - p + int(self.prefix_per_row(p))) * len(lengths) + p
            else:
                plain.append(lengths)
        if plain:
            rest = np.concatenate(plain)
            cost += self.width(int(rest.max())) * len(rest)
        return cost

    def __call__(self, window: Window, rows: np.ndarray, shared: np.ndarray | None) -> int:
        lengths = window.length[rows]
        if not len(rows):
            return 0
        if not self.is_padded:
            return int(lengths.sum())
        if shared is None:
            return self.width(int(lengths.max())) * len(rows)
        prefix = shared[window.part[rows]]
        plain = prefix == 0
        cost = self.width(int(lengths[plain].max())) * int(plain.sum()) if plain.any() else 0
        if not plain.all():
            parts, inverse = np.unique(window.part[rows][~plain], return_inverse=True)
            tails = lengths[~plain] - prefix[~plain]
            longest = np.zeros(len(parts), np.int64)
            np.maximum.at(longest, inverse, tails)
            counts = np.bincount(inverse, minlength=len(parts))
            cost += int(((longest + self.prefix_per_row(shared[parts])) * counts).sum() + shared[parts].sum())
        return cost


def is_small(work: Work, budget: int) -> bool:
    """A search: all of its pairs queued (its one slice) and its tokens at most 1/SMALL_SHARE of the budget."""
    return work.sealed and work.total_tokens * SMALL_SHARE <= budget


def take_batch(
    window: Window,
    queue: FairQueue,
    budget: int,
    max_batch_size: int,
    cost: BatchCost,
    run_budget: int | None = None,
) -> np.ndarray:
    """Rows of the window for the next batch (the window must not be empty), and tell the queue what was
    served. `run_budget`: the budget of a bulk request's length run, when smaller than `budget` (small
    requests keep `budget`)."""
    lead = _argmin2(window.tag, window.seq, None)
    tenant = window.tid[lead]
    # Across tenants the tenant tag decides; inside the chosen tenant, the request tag.
    first = _argmin2(window.rtag, window.seq, window.tid == tenant)
    shared = _shared(window)
    rows = _build(window, first, budget, max_batch_size, cost, shared, min(run_budget or budget, budget))
    # Virtual time moves as far as this batch served the lead tenant (and inside it, the anchor request) in
    # tag order: up to the largest tag it took below every tag of theirs still in the window, or, when it
    # took them all, the largest tag it served. A request arriving now starts there:
    # - Moving only to the anchor's own tag starved the leftovers of a request split across batches under a
    #   closed loop of small requests (each newcomer tied with the one before and went first: p99 = the
    #   whole run, test_no_starvation).
    # - Moving to the largest tag served let a length run (which takes pairs by length, some pulled up to
    #   WINDOW_BATCHES batches ahead) carry virtual time past everything of the tenant in the window: another
    #   tenant arriving then waited for all of it (loaded queue time 35 ms against 6 ms, test_fairness).
    # The tenant level moves only when the lead is served: when a small request of the same tenant went
    # first, a tenant arriving now must still start ahead of the lead, not tie with it.
    taken = np.zeros(len(window), dtype=bool)
    taken[rows] = True
    served_tag = None
    if taken[lead]:
        served_tag = _head(window.tag, window.tid == tenant, taken)
    rtag = _head(window.rtag, window.wid == window.wid[first], taken)
    queue.served(window.work_of(first).tenant, served_tag, rtag)
    return rows


def plan_of(window: Window, rows: np.ndarray, cost: int) -> Plan:
    """The batch of these window rows, grouped by request slice (rows of one slice consecutive)."""
    order = rows[np.argsort(window.part[rows], kind="stable")]
    parts = window.part[order]
    cuts = np.flatnonzero(np.diff(parts)) + 1
    groups = []
    for chunk in np.split(order, cuts):
        work, part = window.parts[int(window.part[chunk[0]])]
        groups.append(Group(work, part, window.item[chunk]))
    return Plan(groups, window.length[order], cost)


def _head(tags: np.ndarray, mine: np.ndarray, taken: np.ndarray) -> float:
    """How far the batch (`taken`) served `mine` in tag order: the largest tag it took below every tag of
    `mine` still left, or the largest it took when none is left. (The anchor, the smallest of `mine`, is
    always taken.)"""
    served = tags[mine & taken]
    left = mine & ~taken
    if not left.any():
        return float(served.max())
    below = served[served < tags[left].min()]
    return float(below.max()) if len(below) else float(served.min())


def _argmin2(primary: np.ndarray, secondary: np.ndarray, mask: np.ndarray | None) -> int:
    """Index of the smallest (primary, secondary) among the rows where mask holds."""
    idx = np.arange(len(primary)) if mask is None else np.flatnonzero(mask)
    p = primary[idx]
    best = idx[p == p.min()]
    return int(best[np.argmin(secondary[best])])


def _shared(window: Window) -> np.ndarray | None:
    """Each part's shared-prefix length, or None when no part has one."""
    shared = np.fromiter((s.prepared.shared for _, s in window.parts), np.int64, count=len(window.parts))
    return shared if shared.any() else None


def _build(
    window: Window, first: int, budget: int, max_batch_size: int, cost: BatchCost, shared: np.ndarray | None, run_budget: int
) -> np.ndarray:
    wid, tid = window.wid, window.tid
    own = np.flatnonzero(wid == wid[first])
    width = cost.width(int(window.length[own].max()))

    def fits(rows: np.ndarray, wide: int, limit: int) -> bool:
        # The padded size bounds every cost from above: the backend's cost is computed only when needed.
        return wide * len(rows) <= limit or (cost.is_padded is False or shared is not None) and cost(window, rows, shared) <= limit

    fits_own = len(own) <= max_batch_size and fits(own, width, budget)
    other_tenants = bool((tid != tid[first]).any())
    other_requests = other_tenants or len(own) < len(window)
    works, inverse, counts = np.unique(wid, return_inverse=True, return_counts=True)

    def small_works() -> np.ndarray:
        """Per distinct request in the window: small, and whole here (not the last pairs of a request)."""
        flags = np.zeros(len(works), bool)
        for k, w in enumerate(works.tolist()):
            work = window.works[w]
            flags[k] = counts[k] == work.n_items and is_small(work, budget)
        return flags

    small = small_works()
    first_small = bool(small[inverse[first]])
    if fits_own and (other_tenants or (other_requests and first_small)):
        room = min(max_batch_size, budget // width) - len(own)
        candidate = (wid != wid[first]) & (window.length <= width)
        if not other_tenants:
            # Inside a tenant only other small requests ride along: a bulk request's pairs would make a
            # 3-document search's batch a full one, and its latency that of the bulk request's batches.
            candidate &= small[inverse]
        filler = np.flatnonzero(candidate)
        filler = filler[np.lexsort((window.seq[filler], window.tag[filler]))]
        batch = np.concatenate([own, filler[: max(room, 0)]])
        if not cost.is_padded or shared is not None:
            # Past the padded room, more fillers while the backend's cost still fits (fillers are no wider
            # than the anchor's request, so the width stays).
            for row in filler[max(room, 0):]:
                grown = np.append(batch, row)
                if len(grown) > max_batch_size or not fits(grown, width, budget):
                    break
                batch = grown
        return batch
    if not first_small and (cost.is_padded or not is_small(window.works[int(wid[first])], budget)):
        # A bulk request's run: cut while searches arrive. A search alone in the window keeps the whole
        # budget. So, on a packed backend, do the pairs of searches a batch before took part of as fillers:
        # there is no bulk work to cut, and a packed batch costs its real tokens however its lengths mix, so
        # a cut run only adds batches, each with its launches (16 clients x 20 documents before a simulated
        # packed device, 1,150,000 tokens/s: 1.12-1.20x the pairs/s with a 0-5 ms floor a batch). A padded
        # backend's leftover runs stay cut: narrower, they pad less (there, the whole budget ran 0.64x on a
        # device the host outruns).
        budget = run_budget
    ordered = np.argsort(window.length, kind="stable")
    lengths = window.length[ordered].tolist()
    anchor = int(np.flatnonzero(ordered == first)[0])
    lo = hi = anchor  # inclusive bounds of the run in length order; ordered[hi] is its widest pair
    packed = not cost.is_padded
    total = lengths[anchor]  # real tokens of the run (a packed batch's cost)

    def run_fits(a: int, b: int, added: int) -> bool:
        if packed:
            return total + added <= budget
        if cost.width(lengths[b]) * (b - a + 1) <= budget:
            return True
        return shared is not None and cost(window, ordered[a : b + 1], shared) <= budget

    # Grow the run by whichever neighbour is nearer in length, while its cost fits the budget.
    while hi - lo + 1 < max_batch_size:
        right = hi + 1 < len(lengths) and run_fits(lo, hi + 1, lengths[hi + 1])
        left = lo > 0 and run_fits(lo - 1, hi, lengths[lo - 1])
        if not (right or left):
            break
        if right and (not left or lengths[hi + 1] - lengths[hi] < lengths[hi] - lengths[lo - 1]):
            hi += 1
            total += lengths[hi]
        else:
            lo -= 1
            total += lengths[lo]
    return ordered[lo : hi + 1]
