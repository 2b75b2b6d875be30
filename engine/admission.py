"""Admission before work: a request's cost is checked against the model's queue limits before it is
tokenized, from an estimate of its size, and again after tokenizing, with the real cost.

While a request tokenizes, its estimate is reserved: a burst of large requests arriving together is
refused at the door instead of all being tokenized first and refused (or queued past the limit) after.
"""

from __future__ import annotations

from dataclasses import dataclass

# English text under BPE / WordPiece tokenizers averages 4-5 characters a token; the lower figure makes
# the estimate larger, which errs towards refusing early only when the queue is really near its limit.
CHARS_PER_TOKEN = 4
# Special tokens around a pair ([CLS] q [SEP] d [SEP], or a chat template's frame, roughly).
PAIR_OVERHEAD_TOKENS = 4


def estimate_cost(query: str, documents: list[str], *, max_length: int, max_chunks: int) -> tuple[int, int]:
    """(pairs, tokens) a request will queue, estimated from its characters."""
    q = len(query) // CHARS_PER_TOKEN + PAIR_OVERHEAD_TOKENS
    pairs = tokens = 0
    for doc in documents:
        want = q + len(doc) // CHARS_PER_TOKEN
        chunks = min(max_chunks, max(1, -(-want // max_length)))
        pairs += chunks
        tokens += min(want, chunks * max_length)
    return pairs, tokens


@dataclass(slots=True)
class Held:
    """What one request still holds of its estimate."""

    pairs: int
    tokens: int
    start_pairs: int
    start_tokens: int


class Reservations:
    """Estimated cost of the requests being tokenized now. The scheduler's lock guards it: the event loop
    reserves and releases, tokenizer threads consume a request's share as each of its slices is queued."""

    def __init__(self) -> None:
        self.pairs = 0
        self.tokens = 0

    def add(self, pairs: int, tokens: int) -> Held:
        self.pairs += pairs
        self.tokens += tokens
        return Held(pairs, tokens, pairs, tokens)

    def consume(self, held: Held, fraction: float) -> None:
        """A slice of `fraction` of the request's documents is queued: that much of its estimate goes."""
        self._take(held, round(held.start_pairs * fraction), round(held.start_tokens * fraction))

    def release(self, held: Held) -> None:
        self._take(held, held.pairs, held.tokens)

    def _take(self, held: Held, pairs: int, tokens: int) -> None:
        pairs, tokens = min(pairs, held.pairs), min(tokens, held.tokens)
        held.pairs -= pairs
        held.tokens -= tokens
        self.pairs -= pairs
        self.tokens -= tokens
