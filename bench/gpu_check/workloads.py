"""The check's workloads, rebuilt identically in every process from fixed seeds (bench.workload's way).

- bge shape: bench.workload's documents over the MiniLM WordPiece vocabulary (~114 real tokens a pair).
- GTE and Qwen3 (tiny trained tokenizers): the same Zipf/lognormal text over tests.tiny_models.WORDS, the
  words those tokenizers were trained on (about one token a word).
"""

from __future__ import annotations

from pathlib import Path

from bench.workload import Request, TextMaker, big_request, small_requests, vocabulary

GTE_SEED = 44
QWEN_SEED = 55


def bge_words(model_dir: Path) -> list[str]:
    return vocabulary(model_dir)


def bge_big(words: list[str], n: int) -> Request:
    return big_request(words, n)


def bge_small(words: list[str], n: int, docs: int) -> list[Request]:
    return small_requests(words, n, docs)


def _tiny_words() -> list[str]:
    from tests.tiny_models import WORDS

    return list(WORDS)


def gte_t4(n_docs: int, n_long: int, long_words: int, loop_requests: int, docs_per_request: int) -> tuple[Request, list[Request]]:
    """One request of n_docs documents, n_long of them long_words words (past 8,192 tokens: cut to the
    model's max_length), spread through it; and the closed loop's small requests."""
    maker = TextMaker(_tiny_words(), GTE_SEED)
    query = maker.text(8)
    docs = [maker.document() for _ in range(n_docs - n_long)]
    step = max(1, n_docs // max(1, n_long))
    for k in range(n_long):
        docs.insert(min(len(docs), k * step), maker.text(long_words))
    small = [maker.request(docs_per_request) for _ in range(loop_requests)]
    return Request(query, docs), small


def qwen_pairs(n_pairs: int, doc_words: int) -> tuple[Request, Request]:
    """Two requests of n_pairs documents of doc_words words (longer than max_length: every pair is cut to it,
    in the official code and in the gateway alike)."""
    maker = TextMaker(_tiny_words(), QWEN_SEED)
    query = maker.text(8)
    docs = [maker.text(doc_words) for _ in range(2 * n_pairs)]
    return Request(query, docs[:n_pairs]), Request(query, docs[n_pairs:])


class PairTokens:
    """Real tokens of each (query, document) pair as a cross-encoder sees it: special tokens included, the
    document cut to fit max_length."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.max_length = max_length

    def __call__(self, query: str, docs: list[str]) -> list[int]:
        enc = self.tokenizer([query] * len(docs), docs, truncation="only_second", max_length=self.max_length)
        return [len(ids) for ids in enc["input_ids"]]


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    def ranks(x: list[float]) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float64)
        order = arr.argsort(kind="mergesort")
        r = np.empty(len(arr))
        r[order] = np.arange(len(arr))
        # ties share their mean rank
        _, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
