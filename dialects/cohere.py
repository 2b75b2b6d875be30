"""Cohere /v1/rerank and /v2/rerank (also Jina's /v1/rerank, which shares the request and reads
`model` and `usage` from the same response)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec

from core.errors import BadRequest, EmptyInput
from core.rerank import RerankRequest, RerankResult, Scored, search_units


# Integer ranges the server enforces; msgspec checks them and the OpenAPI document states them.
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
# A document object is ranked on its fields: one without any field has none to rank on.
DocumentObject = Annotated[dict[str, Any], msgspec.Meta(min_length=1)]
FieldName = Annotated[str, msgspec.Meta(min_length=1)]


def _items(item: Any) -> dict[str, Any]:
    """Litestar's OpenAPI generator drops the constraints of a list's items (minLength of each rank field,
    minProperties of each document object); this writes msgspec's own schema of the item type into the
    document, so the strict decoder and the OpenAPI document read the same annotation."""
    return {"extra": {"items": msgspec.json.schema(item)}}


class CohereRerankRequest(msgspec.Struct, kw_only=True):
    """Union of v1 and v2 fields; unknown fields are accepted and ignored. Decoded strictly
    (gateway.strict_json): no string or float stands in for an integer or a boolean."""

    query: Annotated[str, msgspec.Meta(min_length=1, description="The search query; must not be empty")]
    documents: Annotated[
        list[str | DocumentObject],
        msgspec.Meta(
            min_length=1,
            description=(
                "Texts, or objects ranked on `rank_fields` (default: their `text`); at most server.max_documents. "
                "Every object must have every rank field: the one rule this schema cannot state (a 400 names "
                "the document and the field)"
            ),
            extra_json_schema=_items(str | DocumentObject),
        ),
    ]
    model: str | None = None
    top_n: PositiveInt | None = None
    rank_fields: Annotated[list[FieldName], msgspec.Meta(min_length=1, extra_json_schema=_items(FieldName))] | None = None
    return_documents: bool = False
    max_chunks_per_doc: PositiveInt | None = None
    max_tokens_per_doc: PositiveInt | None = None
    # gt=-1, not ge=0: Litestar's OpenAPI generator drops a bound of 0.
    priority: Annotated[int, msgspec.Meta(gt=-1, le=999)] | None = None
    # Extensions: TEI's raw_scores, Qwen3's instruction, and a user id for sticky A/B splits.
    raw_scores: bool = False
    instruction: str | None = None
    user: str | None = None


class Result(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    # With return_documents: the document as given, a string as {"text": ...}.
    document: dict[str, Any] | None = None


class ApiVersion(msgspec.Struct):
    version: str


class BilledUnits(msgspec.Struct):
    search_units: int


class Meta(msgspec.Struct):
    api_version: ApiVersion
    billed_units: BilledUnits


class Usage(msgspec.Struct):
    total_tokens: int


class CohereRerankResponse(msgspec.Struct):
    id: str
    results: list[Result]
    meta: Meta
    model: str
    usage: Usage


def to_internal(req: CohereRerankRequest, *, max_documents: int) -> RerankRequest:
    if not req.documents:  # the strict decode refuses it first; a struct built in code may still be empty
        raise EmptyInput("documents")
    if len(req.documents) > max_documents:
        raise BadRequest(f"invalid request: {len(req.documents)} documents given; the maximum is {max_documents}")
    if req.top_n is not None and req.top_n < 1:
        raise BadRequest("invalid request: top_n must be at least 1")
    for name in ("max_chunks_per_doc", "max_tokens_per_doc"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise BadRequest(f"invalid request: {name} must be at least 1")
    if req.priority is not None and not 0 <= req.priority <= 999:
        raise BadRequest("invalid request: priority must be between 0 and 999")
    return RerankRequest(
        query=req.query,
        texts=[_document_text(doc, i, req.rank_fields) for i, doc in enumerate(req.documents)],
        model=req.model,
        top_n=req.top_n,
        raw_scores=req.raw_scores,
        max_tokens_per_doc=req.max_tokens_per_doc,
        max_chunks_per_doc=req.max_chunks_per_doc,
        priority=req.priority or 0,
        instruction=req.instruction,
        user=req.user,
    )


def _document_text(doc: str | dict[str, Any], i: int, rank_fields: list[str] | None) -> str:
    if isinstance(doc, str):
        return doc
    fields = rank_fields or ["text"]
    missing = [f for f in fields if f not in doc]
    if missing:
        raise BadRequest(f"invalid request: documents[{i}] has no field {missing[0]!r} to rank on")
    values = [doc[f] if isinstance(doc[f], str) else msgspec.json.encode(doc[f]).decode() for f in fields]
    if len(fields) == 1:
        return values[0]
    # Several rank fields are ranked as "field: value" lines, as Cohere does.
    return "\n".join(f"{f}: {v}" for f, v in zip(fields, values))


def to_response(
    req: CohereRerankRequest, result: RerankResult, *, api_version: str
) -> CohereRerankResponse:
    results = []
    for index, score in zip(result.indices, result.scores):
        document = None
        if req.return_documents:
            doc = req.documents[index]
            document = {"text": doc} if isinstance(doc, str) else doc
        results.append(Result(index=index, relevance_score=score, document=document))
    return CohereRerankResponse(
        id=str(uuid.uuid4()),
        results=results,
        meta=Meta(ApiVersion(api_version), BilledUnits(search_units(result.scored_units))),
        model=result.model,
        usage=Usage(result.total_tokens),
    )


# -- calling an upstream that speaks Cohere (backend: remote; jina, vllm and gateway reuse these) ---------

PATH_V1 = "/v1/rerank"
PATH_V2 = "/v2/rerank"
# Cohere's recommended maximum per request (it accepts 10,000).
MAX_DOCUMENTS_PER_CALL = 1000


class _UpstreamResult(msgspec.Struct):
    index: int
    relevance_score: float


class _UpstreamResponse(msgspec.Struct):
    results: list[_UpstreamResult]
    usage: Usage | None = None  # Jina, vLLM and rerank-gateway report tokens; Cohere does not


class _UpstreamError(msgspec.Struct):
    message: str


def upstream_body(req: RerankRequest, texts: list[str], model: str, top_n: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "query": req.query, "documents": texts}
    if top_n is not None:
        body["top_n"] = top_n
    if req.max_tokens_per_doc is not None:
        body["max_tokens_per_doc"] = req.max_tokens_per_doc
    return body


def upstream_answer(content: bytes, headers: Any) -> Scored:
    resp = msgspec.json.decode(content, type=_UpstreamResponse)
    return Scored([r.index for r in resp.results], [r.relevance_score for r in resp.results], resp.usage.total_tokens if resp.usage else None)


def upstream_error(content: bytes) -> str:
    return msgspec.json.decode(content, type=_UpstreamError).message
