"""The rerank routes of every dialect: Cohere's /v1/rerank and /v2/rerank (Jina's too), Voyage's, TEI's, and
the bare /rerank that Jina-, Cohere- and TEI-shaped clients all post to (a body with `texts` and no
`documents` is TEI's).

Every route checks its body strictly (gateway.strict_json) and answers errors in its dialect through the
one error mechanism (gateway.http_errors): Voyage's and TEI's routes name their `ErrorDialect`, /rerank
picks Cohere's or TEI's once the body says which it is. A limit, a missing model or a bad field thus says
the same thing in every dialect, in that dialect's shape (and for TEI, its status)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import msgspec
from litestar import MediaType, Request, Response, post
from litestar.openapi.spec import OpenAPIMediaType, Operation, Reference, RequestBody, Schema

from dialects import cohere, tei, voyage
from gateway import strict_json
from gateway.http_errors import COHERE, RERANK_ERRORS, dialect_opt, error_responses, use_dialect
from serving import pipeline
from serving.service import RerankService
from tenancy.caller import Caller
from tenancy.limits import Limiter
from tenancy.usage import UsageStore


async def _run_rerank(
    request: Request,
    service: RerankService,
    data: cohere.CohereRerankRequest,
    api_version: str,
    *,
    caller: Caller,
    limiter: Limiter,
    usage: UsageStore,
) -> Response:
    """Dialect -> internal request -> serving.pipeline -> dialect."""
    internal = cohere.to_internal(data, max_documents=service.registry.server.max_documents)
    routed = await pipeline.rerank(request, service, internal, caller=caller, limiter=limiter, usage=usage)
    body = cohere.to_response(data, routed.result, api_version=api_version)
    return Response(body, headers=pipeline.headers(routed), media_type=MediaType.JSON)


_STRICT_RERANK = strict_json.strict_body(cohere.CohereRerankRequest)


@post(
    "/v1/rerank", status_code=200, summary="Rerank (Cohere v1 / Jina)",
    before_request=_STRICT_RERANK, responses=error_responses(*RERANK_ERRORS),
)
async def rerank_v1(
    request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore, data: cohere.CohereRerankRequest
) -> Response[cohere.CohereRerankResponse]:
    return await _run_rerank(request, service, data, "1", caller=caller, limiter=limiter, usage=usage)


@post(
    "/v2/rerank", status_code=200, summary="Rerank (Cohere v2)",
    before_request=_STRICT_RERANK, responses=error_responses(*RERANK_ERRORS),
)
async def rerank_v2(
    request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore, data: cohere.CohereRerankRequest
) -> Response[cohere.CohereRerankResponse]:
    return await _run_rerank(request, service, data, "2", caller=caller, limiter=limiter, usage=usage)


@post(
    "/voyage/v1/rerank", status_code=200, summary="Rerank (Voyage AI)",
    before_request=strict_json.strict_body(voyage.VoyageRerankRequest),
    opt=dialect_opt(voyage.ERRORS), responses=error_responses(*RERANK_ERRORS, dialect=voyage.ERRORS),
)
async def rerank_voyage(
    request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore, data: voyage.VoyageRerankRequest
) -> Response[voyage.VoyageRerankResponse]:
    internal = voyage.to_internal(data, max_documents=service.registry.server.max_documents)
    routed = await pipeline.rerank(request, service, internal, caller=caller, limiter=limiter, usage=usage)
    return Response(voyage.to_response(data, routed.result), headers=pipeline.headers(routed), media_type=MediaType.JSON)


@post(
    "/tei/rerank", status_code=200, summary="Rerank (Hugging Face TEI)",
    before_request=strict_json.strict_body(tei.TeiRerankRequest),
    opt=dialect_opt(tei.ERRORS), responses=error_responses(*RERANK_ERRORS, dialect=tei.ERRORS),
)
async def rerank_tei(
    request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore, data: tei.TeiRerankRequest
) -> Response[list[tei.Rank]]:
    return await _tei(request, service, data, caller=caller, limiter=limiter, usage=usage)


class _Shape(msgspec.Struct):
    # Only which keys are there; Raw leaves their values undecoded.
    texts: msgspec.Raw = msgspec.Raw(b"")
    documents: msgspec.Raw = msgspec.Raw(b"")


_BARE_BODY = "rerank_body"


async def _strict_bare(request: Request) -> None:
    """before_request of /rerank: which dialect the body is (TEI's: `texts` and no `documents`), then the
    strict decode into that dialect's request; from here on errors answer in that dialect."""
    raw = await request.body()
    max_depth = strict_json.server_max_depth(request)
    kind: type = cohere.CohereRerankRequest
    if raw.strip():
        strict_json.check_depth(raw, max_depth)
        try:
            shape = msgspec.json.decode(raw, type=_Shape)
        except (msgspec.DecodeError, msgspec.ValidationError):
            shape = None  # not a JSON object: the strict decode below says so, in Cohere's shape
        if shape is not None and len(shape.texts) and not len(shape.documents):
            kind = tei.TeiRerankRequest
            use_dialect(request, tei.ERRORS)
    request.state[_BARE_BODY] = strict_json.decode(raw, kind, max_depth=max_depth)


@dataclass
class _BareOperation(Operation):
    """/rerank reads its body itself (two dialects, told apart by their keys), so Litestar cannot derive
    its request body: the document says it is Cohere's v1 request or TEI's."""

    def __post_init__(self) -> None:
        # Components by their struct's name: /v1/rerank and /tei/rerank register both schemas.
        refs = [Reference(f"#/components/schemas/{t.__name__}") for t in (cohere.CohereRerankRequest, tei.TeiRerankRequest)]
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=Schema(any_of=refs))},
            required=True,
            description="Cohere v1 / Jina (`documents`), or TEI's (`texts` and no `documents`)",
        )


@post(
    "/rerank", status_code=200,
    summary="Rerank: Cohere v1 / Jina body (`documents`), or TEI's (`texts`), answered in the same dialect",
    before_request=_strict_bare, operation_class=_BareOperation,
    responses=error_responses(*RERANK_ERRORS, dialect=(COHERE, tei.ERRORS)),
)
async def rerank_bare(
    request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore
) -> Response[Union[cohere.CohereRerankResponse, list[tei.Rank]]]:
    data = request.state[_BARE_BODY]
    if isinstance(data, tei.TeiRerankRequest):
        return await _tei(request, service, data, caller=caller, limiter=limiter, usage=usage)
    internal = cohere.to_internal(data, max_documents=service.registry.server.max_documents)
    routed = await pipeline.rerank(request, service, internal, caller=caller, limiter=limiter, usage=usage)
    body = cohere.to_response(data, routed.result, api_version="1")
    return Response(body, headers=pipeline.headers(routed), media_type=MediaType.JSON)


async def _tei(
    request: Request, service: RerankService, data: tei.TeiRerankRequest, *, caller: Caller, limiter: Limiter, usage: UsageStore
) -> Response[list[tei.Rank]]:
    internal = tei.to_internal(data, max_documents=service.registry.server.max_documents)
    routed = await pipeline.rerank(request, service, internal, caller=caller, limiter=limiter, usage=usage)
    return Response(tei.to_response(data, routed.result), headers=pipeline.headers(routed), media_type=MediaType.JSON)


HANDLERS = [rerank_v1, rerank_v2, rerank_voyage, rerank_tei, rerank_bare]
