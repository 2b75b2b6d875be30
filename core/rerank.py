"""The internal request and result types. Every API dialect maps onto these at the edge."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RerankRequest:
    query: str
    texts: list[str]  # what is ranked, one per document, already extracted from objects / rank_fields
    model: str | None = None
    top_n: int | None = None
    raw_scores: bool = False
    max_tokens_per_doc: int | None = None
    max_chunks_per_doc: int | None = None
    priority: int = 0
    instruction: str | None = None
    user: str | None = None
    # False refuses (400) a document that does not fit the model instead of truncating it (Voyage's
    # `truncation: false`, TEI's `truncate: false`).
    truncate: bool = True


@dataclass(slots=True)
class RerankResult:
    model: str  # the model id that answered
    indices: list[int]  # document positions in the request, best first
    scores: list[float]
    total_tokens: int
    scored_units: int  # documents, counting each chunk of a chunked document
    queue_s: float = 0.0
    tokenize_s: float = 0.0
    inference_s: float = 0.0
    route: str | None = None


@dataclass(slots=True)
class Scored:
    """What an upstream rerank service answered for one call: positions within the texts it was sent,
    best first, and the tokens it metered when it says."""

    indices: list[int]
    scores: list[float]
    tokens: int | None = None


def search_units(scored_units: int) -> int:
    """Cohere's billing unit: one query with up to 100 documents (chunks counted)."""
    return max(1, -(-scored_units // 100))


def max_scored_units(req: RerankRequest) -> int:
    """The most pairs a request can become once tokenized, known before any work: each document yields at
    most max_chunks_per_doc chunks, and at most one per byte of its text plus one (every tokenizer we
    serve spends at least a byte a token). Quota is reserved for this and settled with the real count, so
    one call cannot bill past the tenant's search_units_per_day."""
    chunks = req.max_chunks_per_doc or 1
    if chunks == 1:
        return len(req.texts)
    return sum(min(chunks, len(text.encode("utf-8", "surrogatepass")) + 1) for text in req.texts)
