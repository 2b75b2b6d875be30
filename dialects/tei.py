"""Hugging Face text-embeddings-inference's POST /rerank, served at /tei/rerank and at /rerank when the
body carries `texts`, and spoken to an upstream for `backend: remote` with `dialect: tei`.

Shapes from TEI's router (http/types.rs, its OpenAPI document): the request is {query, texts, truncate
(null = the server's default), truncation_direction (Left/Right, any case), raw_scores, return_text}; the
answer is a bare array of {index, text?, score}, every text, best first; errors are {error, error_type}
with error_type one of Unhealthy, Backend, Overloaded, Validation, Tokenizer, Empty (serde writes the
variant names as they are) and the status TEI gives each type."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from core.errors import BadRequest, EmptyInput, GatewayError, InferenceFailed, ModelUnavailable, ServiceUnavailable, Timeout, TooManyRequests
from core.rerank import RerankRequest, RerankResult, Scored
from dialects.errors import ErrorDialect

PATH = "/rerank"
# TEI's --max-client-batch-size default; an upstream TEI refuses more texts per call.
MAX_DOCUMENTS_PER_CALL = 32

ErrorType = Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]
STATUS = {"Unhealthy": 503, "Backend": 424, "Overloaded": 429, "Validation": 422, "Tokenizer": 422, "Empty": 400}


class TeiRerankRequest(msgspec.Struct, kw_only=True):
    query: str
    # An empty list is TEI's 400 Empty (error_type below); stated here so the OpenAPI document says it too.
    texts: Annotated[list[str], msgspec.Meta(min_length=1)]
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    raw_scores: bool = False
    return_text: bool = False
    # Not TEI's (it serves one model): which model answers; the default model when absent.
    model: str | None = None


class Rank(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    text: str | None = None  # TEI's field order: index, text, score
    score: float


class TeiError(msgspec.Struct):
    error: str
    error_type: ErrorType


def to_internal(req: TeiRerankRequest, *, max_documents: int) -> RerankRequest:
    if not req.texts:  # the strict decode refuses it first; a struct built in code may still be empty
        raise EmptyInput("texts")
    if len(req.texts) > max_documents:
        raise BadRequest(f"batch size {len(req.texts)} > maximum allowed batch size {max_documents}")
    # Only right truncation is implemented; asking for left gets over-long texts refused, not cut wrongly.
    truncate = req.truncate is not False and req.truncation_direction.lower() == "right"
    return RerankRequest(query=req.query, texts=list(req.texts), model=req.model, raw_scores=req.raw_scores, truncate=truncate)


def to_response(req: TeiRerankRequest, result: RerankResult) -> list[Rank]:
    return [
        Rank(index=i, score=s, text=req.texts[i] if req.return_text else None) for i, s in zip(result.indices, result.scores)
    ]


def _empty_texts(exc: Exception | None) -> bool:
    """TEI answers an empty `texts` with its own type, status (400 Empty) and wording."""
    return isinstance(exc, EmptyInput) and exc.field == "texts"


def error_type(status: int, exc: Exception | None) -> ErrorType:
    if _empty_texts(exc):
        return "Empty"
    if isinstance(exc, TooManyRequests) or status == 429:
        return "Overloaded"
    if isinstance(exc, (ModelUnavailable, ServiceUnavailable)):
        return "Unhealthy"
    if isinstance(exc, (InferenceFailed, Timeout)) or (status >= 500 and not isinstance(exc, GatewayError)):
        return "Backend"
    return "Validation"


def error_status(status: int, exc: Exception | None) -> int:
    # TEI's status for the type, except the statuses TEI has no type for (401, 403, 404, 413), kept as is.
    return status if status in (401, 403, 404, 413) else STATUS[error_type(status, exc)]


# How this dialect writes an error (dialects.errors); for OpenAPI, what each gateway status becomes:
# a 400 is Empty (400) or Validation (422), a timeout a Backend error (424).
ERRORS = ErrorDialect(
    TeiError,
    lambda status, message, exc: TeiError("`texts` cannot be empty" if _empty_texts(exc) else message, error_type(status, exc)),
    status=error_status,
    documented={400: (400, 422), 504: (424,)},
)


# -- calling an upstream that speaks TEI ------------------------------------------------------------------


def upstream_body(req: RerankRequest, texts: list[str], model: str, top_n: int | None) -> dict[str, Any]:
    # TEI serves one model and has no top_n: every text comes back and the caller cuts.
    return {"query": req.query, "texts": texts, "truncate": req.truncate, "raw_scores": req.raw_scores, "return_text": False}


def upstream_answer(content: bytes, headers: Any) -> Scored:
    ranks = msgspec.json.decode(content, type=list[Rank])
    tokens = headers.get("x-compute-tokens")
    return Scored([r.index for r in ranks], [r.score for r in ranks], int(tokens) if tokens and tokens.isdigit() else None)


def upstream_error(content: bytes) -> str:
    err = msgspec.json.decode(content, type=TeiError)
    return f"{err.error_type}: {err.error}"
