"""The window: pairs pulled from the fair queue and not yet in a batch, as columns of arrays.

Batches are built from the window (engine.batching), a few batches deep so that pairs of similar length
from every queued request can share a batch. Each pulled run of a slice is a `part`; a row of the window
is one pair: its part, its index in the part's slice, its length and fair-queue tags, and the request and
tenant it belongs to as small integers, so the batch builder works with masks and argmins over arrays.
"""

from __future__ import annotations

import itertools

import numpy as np

from engine.fair_queue import Run
from engine.work import Slice, Work


class Window:
    COLUMNS = ("part", "item", "length", "tag", "rtag", "seq", "wid", "tid")

    def __init__(self) -> None:
        self.part = np.zeros(0, np.int64)  # index into self.parts
        self.item = np.zeros(0, np.int64)  # pair index within the part's slice
        self.length = np.zeros(0, np.int64)
        self.tag = np.zeros(0, np.float64)
        self.rtag = np.zeros(0, np.float64)
        self.seq = np.zeros(0, np.int64)  # pull order, to break ties between equal tags
        self.wid = np.zeros(0, np.int64)  # the request (Work.seq)
        self.tid = np.zeros(0, np.int64)  # the tenant (index into self.tenant_ids)
        self.parts: list[tuple[Work, Slice]] = []
        self.works: dict[int, Work] = {}  # wid -> Work, for requests with rows here
        self.tenant_ids: dict[str, int] = {}
        self._part_of: dict[int, int] = {}  # id(slice) -> part index
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.length)

    @property
    def tokens(self) -> int:
        return int(self.length.sum())

    def add(self, runs: list[Run]) -> None:
        if not runs:
            return
        cols: dict[str, list[np.ndarray]] = {c: [] for c in self.COLUMNS}
        for run in runs:
            part = self._part_of.get(id(run.part))
            if part is None:
                part = self._part_of[id(run.part)] = len(self.parts)
                self.parts.append((run.work, run.part))
            tid = self.tenant_ids.setdefault(run.work.tenant, len(self.tenant_ids))
            self.works[run.work.seq] = run.work
            n = len(run.items)
            cols["part"].append(np.full(n, part, np.int64))
            cols["item"].append(run.items.astype(np.int64, copy=False))
            cols["length"].append(run.lengths.astype(np.int64))
            cols["tag"].append(run.tags)
            cols["rtag"].append(run.rtags)
            cols["seq"].append(np.fromiter(itertools.islice(self._seq, n), np.int64, count=n))
            cols["wid"].append(np.full(n, run.work.seq, np.int64))
            cols["tid"].append(np.full(n, tid, np.int64))
        for c in self.COLUMNS:
            setattr(self, c, np.concatenate([getattr(self, c), *cols[c]]))

    def keep(self, mask: np.ndarray) -> None:
        """Keep the rows where mask is True (drop the others)."""
        for c in self.COLUMNS:
            setattr(self, c, getattr(self, c)[mask])
        live = set(np.unique(self.wid).tolist())
        for wid in [w for w in self.works if w not in live]:
            del self.works[wid]
        if len(self.parts) > 64 and len(self.parts) > 4 * len(live):
            self._compact_parts()

    def drop_work(self, work: Work) -> None:
        if work.seq in self.works:
            self.keep(self.wid != work.seq)

    def work_of(self, row: int) -> Work:
        return self.parts[int(self.part[row])][0]

    def _compact_parts(self) -> None:
        used, inverse = np.unique(self.part, return_inverse=True)
        self.parts = [self.parts[int(k)] for k in used]
        self.part = inverse.astype(np.int64)
        self._part_of = {id(s): k for k, (_, s) in enumerate(self.parts)}
