"""From a request's scored pairs to its answer: chunk pooling (a document scores as its best chunk),
the relevance transform and top-k, on the device, with one device-to-host copy per request."""

from __future__ import annotations

import math
from typing import Callable

import torch

from backends.base import Prepared


def gather_scores(n_items: int, parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """One float32 tensor of every item's raw score, from the parts the batches produced."""
    device = parts[0][1].device
    raw = torch.full((n_items,), float("-inf"), device=device, dtype=torch.float32)
    items = torch.tensor([i for idx, _ in parts for i in idx], device=device)
    raw.index_copy_(0, items, torch.cat([s for _, s in parts]).float())
    return raw


def top_k(
    prepared: Prepared, raw: torch.Tensor, top_n: int, relevance: Callable[[torch.Tensor], torch.Tensor] | None
) -> tuple[list[int], list[float]]:
    """(document indices, scores), best first. `relevance` None keeps raw scores. Raises ValueError
    when a score is not finite: JSON has no NaN, and a NaN ranks nowhere."""
    p = prepared
    if len(p.doc_index) != p.n_docs or p.doc_index != list(range(p.n_docs)):
        index = torch.tensor(p.doc_index, device=raw.device)
        per_doc = torch.full((p.n_docs,), float("-inf"), device=raw.device).scatter_reduce(0, index, raw, "amax")
    else:
        per_doc = raw
    scores = per_doc if relevance is None else relevance(per_doc)
    values, indices = torch.topk(scores, min(top_n, p.n_docs))
    # One device-to-host copy per request; float64 holds every index exactly.
    both = torch.stack([values.double(), indices.double()]).cpu()
    out_scores = both[0].tolist()
    if not all(math.isfinite(v) for v in out_scores):
        raise ValueError("a score is not finite")
    return [int(i) for i in both[1].tolist()], out_scores
