"""Token sequences as flat arrays: many sequences end to end in one int32 array, with their lengths.

A request's pairs, the rows of a batch and the queue's bookkeeping all hold sequences this way, so the work
per pair is a few numpy operations per request or per batch, not Python objects per pair or per token: on
a fast GPU the host's per-pair Python is what bounds throughput (a list of ints costs 36 bytes a token,
and every loop over pairs holds the GIL that tokenizer threads and the event loop also need).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """Start of each sequence and the end of the last (int64, n + 1)."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def flatten(sequences: Sequence[Sequence[int]], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """(flat tokens, lengths int32) of sequences given as lists (what a tokenizer returns) or arrays."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
    total = int(lengths.sum())
    if sequences and isinstance(sequences[0], np.ndarray):
        flat = np.concatenate(sequences).astype(dtype, copy=False) if total else np.zeros(0, dtype=dtype)
    else:
        flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=dtype, count=total)
    return flat, lengths


def gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions in a flat array of the sequences starting at `starts` with `lengths`, end to end."""
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # Each sequence's positions are start + 0..len-1: the running position minus where its run began.
    shift = starts.astype(np.int64, copy=False) - offsets_of(lengths)[:-1]
    return np.repeat(shift, lengths) + np.arange(total, dtype=np.int64)


def assemble(head: np.ndarray, middles: Sequence[Sequence[int]], tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """head + middle + tail for every middle, end to end: (flat int32, lengths int32). The template's fixed
    parts are written with broadcasts, the middles with one masked copy."""
    flat_mid, mid_lengths = flatten(middles)
    lengths = (mid_lengths + (len(head) + len(tail))).astype(np.int32)
    out = np.empty(int(lengths.sum()), dtype=np.int32)
    fixed = frame(out, lengths, head, tail)
    out[~fixed] = flat_mid
    return out, lengths


def frame(out: np.ndarray, lengths: np.ndarray, head: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Write `head` at the start and `tail` at the end of every sequence of `out` (laid out by `lengths`);
    returns where they went (bool, like out)."""
    offsets = offsets_of(lengths)
    fixed = np.zeros(len(out), dtype=bool)
    for part, at in ((head, offsets[:-1, None]), (tail, offsets[1:, None] - len(tail))):
        if len(part):
            where = (at + np.arange(len(part))).ravel()
            out[where] = np.tile(part, len(lengths))
            fixed[where] = True
    return fixed


def padded_mask(lengths: np.ndarray, width: int, left: bool) -> np.ndarray:
    """[n, width] bool: where each row's tokens go in a padded batch (row-major order = sequence order)."""
    cols = np.arange(width)
    if left:
        return cols[None, :] >= (width - lengths)[:, None]
    return cols[None, :] < lengths[:, None]
