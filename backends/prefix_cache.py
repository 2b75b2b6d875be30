"""Key/value caches of shared prompt prefixes, for decoder rerankers (backends.qwen3).

A request's pairs all start with the same tokens (system prompt, instruction, query). The prefix runs
once; its per-layer keys and values are kept here, keyed by the prefix's token ids, so every batch of
that request (and any other request with the same instruction and query) runs only its own tokens.
The cache is a small LRU bounded in bytes; the engine's CPU streams share it.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from backends.token_arrays import offsets_of

# Per model. A Qwen3-4B prefix of ~80 tokens holds 36 layers x 2 x 8 kv-heads x 128 x 80 x 2 bytes ~ 12 MB.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    """The token ids every pair of a request starts with (a request's `Prepared.context`)."""

    ids: tuple[int, ...]

    def __init__(self, ids) -> None:
        object.__setattr__(self, "ids", tuple(ids.tolist() if isinstance(ids, np.ndarray) else ids))


def common_prefix_length(ids: np.ndarray, lengths: np.ndarray) -> int:
    """Tokens every sequence (laid out end to end in `ids`) starts with, leaving each at least its last."""
    if not len(lengths):
        return 0
    n = int(lengths.min()) - 1
    if n <= 0:
        return 0
    starts = offsets_of(lengths)[:-1]
    heads = ids[starts[:, None] + np.arange(n)]  # [pairs, n]: every sequence's first n tokens
    differs = (heads != heads[0]).any(axis=0)
    return int(np.argmax(differs)) if differs.any() else n


class PrefixCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[SharedPrefix, tuple[KV, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __contains__(self, prefix: SharedPrefix) -> bool:
        with self._lock:
            return prefix in self._entries

    def get_or_compute(self, prefix: SharedPrefix, compute: Callable[[SharedPrefix], KV]) -> KV:
        with self._lock:
            entry = self._entries.get(prefix)
            if entry is not None:
                self._entries.move_to_end(prefix)
                self.hits += 1
                return entry[0]
            self.misses += 1
        # Outside the lock: two streams may compute the same prefix at once; both results are equal.
        kv = compute(prefix)
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        with self._lock:
            if prefix not in self._entries and size <= self.max_bytes:
                self._entries[prefix] = (kv, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, old) = self._entries.popitem(last=False)
                    self._bytes -= old
        return kv
