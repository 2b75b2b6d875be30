"""Voyage AI's POST /v1/rerank, served at /voyage/v1/rerank (the SDK takes a base_url ending in /v1 and
posts base_url + "/rerank"), and spoken to an upstream for `backend: remote` with `dialect: voyage`.

Shapes checked against voyageai 0.5.0: the SDK sends {query, documents, model, top_k, truncation},
reads data[].index / relevance_score and usage.total_tokens (it fails without them), takes `document`
from its own list, and reads an error's message from `detail`."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from core.errors import BadRequest, EmptyInput
from core.rerank import RerankRequest, RerankResult, Scored
from dialects.cohere import PositiveInt
from dialects.errors import ErrorDialect

# Voyage's own limit, applied to this dialect whatever the server's max_documents.
MAX_DOCUMENTS = 1000
PATH = "/rerank"  # appended to the base URL, which carries the /v1


class VoyageRerankRequest(msgspec.Struct, kw_only=True):
    query: str
    documents: Annotated[list[str], msgspec.Meta(min_length=1)]
    model: str | None = None
    top_k: PositiveInt | None = None
    truncation: bool = True
    return_documents: bool = False


class VoyageResult(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: str | None = None  # a plain string here, not Cohere's {text}


class VoyageUsage(msgspec.Struct):
    total_tokens: int


class VoyageRerankResponse(msgspec.Struct):
    object: str
    data: list[VoyageResult]
    model: str
    usage: VoyageUsage


class VoyageError(msgspec.Struct):
    detail: str


def to_internal(req: VoyageRerankRequest, *, max_documents: int) -> RerankRequest:
    if not req.documents:  # the strict decode refuses it first; a struct built in code may still be empty
        raise EmptyInput("documents")
    limit = min(MAX_DOCUMENTS, max_documents)
    if len(req.documents) > limit:
        raise BadRequest(f"invalid request: {len(req.documents)} documents given; the maximum is {limit}")
    if req.top_k is not None and req.top_k < 1:
        raise BadRequest("invalid request: top_k must be at least 1")
    return RerankRequest(query=req.query, texts=list(req.documents), model=req.model, top_n=req.top_k, truncate=req.truncation)


def to_response(req: VoyageRerankRequest, result: RerankResult) -> VoyageRerankResponse:
    data = [
        VoyageResult(index=i, relevance_score=s, document=req.documents[i] if req.return_documents else None)
        for i, s in zip(result.indices, result.scores)
    ]
    return VoyageRerankResponse(object="list", data=data, model=result.model, usage=VoyageUsage(result.total_tokens))


# How this dialect writes an error (dialects.errors): Voyage's {"detail"}, with the gateway's status.
ERRORS = ErrorDialect(VoyageError, lambda _status, message, _exc: VoyageError(message))


# -- calling an upstream that speaks Voyage ---------------------------------------------------------------


class _UpstreamResponse(msgspec.Struct):
    data: list[VoyageResult]
    usage: VoyageUsage | None = None


def upstream_body(req: RerankRequest, texts: list[str], model: str, top_n: int | None) -> dict[str, Any]:
    return {"query": req.query, "documents": texts, "model": model, "top_k": top_n, "truncation": req.truncate}


def upstream_answer(content: bytes, headers: Any) -> Scored:
    resp = msgspec.json.decode(content, type=_UpstreamResponse)
    return Scored([r.index for r in resp.data], [r.relevance_score for r in resp.data], resp.usage.total_tokens if resp.usage else None)


def upstream_error(content: bytes) -> str:
    return msgspec.json.decode(content, type=VoyageError).detail
