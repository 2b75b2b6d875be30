"""The length-sorted token-budget loop a user writes by hand, the benchmarks' in-process reference: tokenize
all pairs, sort them by length, cut batches whose padded size stays within a token budget, forward each.

The batching and collation live here once; each benchmark's loop (bench.systems' ceiling, bench.host_path,
bench.gpu_check's fp16 peer) runs its batches its own way (threads, device, CUDA events).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def length_runs(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Pair indices sorted by length, cut into batches whose padded size (the widest pair x the pairs)
    stays within `budget`; a batch holds at least one pair."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and lengths[order[end]] * (end - start + 1) <= budget:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def padded(ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None, rows: list[int], pad: int = 0) -> dict[str, torch.Tensor]:
    """The model inputs of one batch (rows sorted by length, the widest last), right-padded to its widest:
    input_ids, attention_mask and, when the tokenizer gives them, token_type_ids."""
    width = len(ids[rows[-1]])
    input_ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    token_types = np.zeros((len(rows), width), dtype=np.int64)
    for r, i in enumerate(rows):
        n = len(ids[i])
        input_ids[r, :n] = ids[i]
        mask[r, :n] = 1
        if types is not None:
            token_types[r, :n] = types[i]
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = token_types
    return {k: torch.from_numpy(v) for k, v in batch.items()}
