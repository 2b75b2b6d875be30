"""From a request's scored pairs to its answer: chunk pooling (a document scores as its best chunk),
the relevance transform and top-k, on the device, with one device-to-host copy per request."""

from __future__ import annotations

import math
from typing import Callable

import torch



def top_k(
    raw: torch.Tensor, doc_index: torch.Tensor, n_docs: int, top_n: int, relevance: Callable[[torch.Tensor], torch.Tensor] | None
) -> tuple[list[int], list[float]]:
    """(document indices, scores), best first, from every pair's raw score and the document it scores (a
    document scores as its best chunk). `relevance` None keeps raw scores. Raises ValueError when a score is
    not finite: JSON has no NaN, and a NaN ranks nowhere."""
    per_doc = torch.full((n_docs,), float("-inf"), device=raw.device).scatter_reduce(0, doc_index, raw, "amax")
    scores = per_doc if relevance is None else relevance(per_doc)
    values, indices = torch.topk(scores, min(top_n, n_docs))
    # One device-to-host copy per request; float64 holds every index exactly.
    both = torch.stack([values.double(), indices.double()]).cpu()
    out_scores = both[0].tolist()
    if not all(math.isfinite(v) for v in out_scores):
        raise ValueError("a score is not finite")
    return [int(i) for i in both[1].tolist()], out_scores
