"""The benchmark's workloads, rebuilt identically in every process from fixed seeds.

Documents are words drawn (Zipf-weighted) from a fixed vocabulary: the whole-word entries of the model's
own WordPiece vocabulary, so a word is about one token, as in plain English text. Document lengths are
lognormal, clipped to 8..400 words.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

VOCAB_SEED = 11
BIG_SEED = 22
SMALL_SEED = 33
MIN_WORDS, MAX_WORDS = 8, 400
# Median 80 words, mean ~105: most documents are short, a long tail reaches the 400-word clip.
LOG_MEDIAN_WORDS, LOG_SIGMA = math.log(80), 0.75


@dataclass(frozen=True, slots=True)
class Request:
    query: str
    documents: list[str]


def vocabulary(model_dir: str | Path) -> list[str]:
    vocab = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    words = sorted(w for w in vocab if w.isascii() and w.isalpha() and w.islower() and len(w) >= 3)
    random.Random(VOCAB_SEED).shuffle(words)  # the shuffled order is the Zipf rank
    return words


class TextMaker:
    def __init__(self, words: list[str], seed: int) -> None:
        self.words = words
        self.weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
        self.rng = random.Random(seed)

    def text(self, n_words: int) -> str:
        return " ".join(self.rng.choices(self.words, cum_weights=self.weights, k=n_words))

    def document(self) -> str:
        n = int(self.rng.lognormvariate(LOG_MEDIAN_WORDS, LOG_SIGMA))
        return self.text(min(MAX_WORDS, max(MIN_WORDS, n)))

    def request(self, n_docs: int) -> Request:
        return Request(self.text(self.rng.randint(5, 12)), [self.document() for _ in range(n_docs)])


def big_request(words: list[str], n_docs: int) -> Request:
    """One request of n_docs documents of varied length."""
    return TextMaker(words, BIG_SEED).request(n_docs)


def small_requests(words: list[str], n_requests: int, docs_per_request: int) -> list[Request]:
    """Many small requests, each with its own query, as concurrent clients send them."""
    maker = TextMaker(words, SMALL_SEED)
    return [maker.request(docs_per_request) for _ in range(n_requests)]
