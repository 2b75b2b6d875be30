"""The Voyage and TEI routes, and the bare /rerank that Jina-, Cohere- and TEI-shaped clients all post to
(a body with `texts` and no `documents` is TEI's).

Errors keep one set of handlers (gateway.http_errors): these routes wrap them and only reshape the body
(and, for TEI, the status) into the dialect's own error, so a limit, a missing model or a bad field says
the same thing in every dialect."""

from __future__ import annotations

from typing import Any, Callable

import msgspec
from litestar import MediaType, Request, Response, post

from core.errors import BadRequest
from gateway import pipeline
from gateway.http_errors import EXCEPTION_HANDLERS
from gateway.limits import Limiter
from gateway.protocol import cohere, tei, voyage
from gateway.service import Caller, RerankService
from gateway.usage import UsageStore

# status, message, exception -> the status and body the dialect answers with
ErrorShape = Callable[[int, str, Exception], tuple[int, Any]]
ERROR_SHAPES: dict[str, ErrorShape] = {"voyage": voyage.error_body, "tei": tei.error_body}


def _dialect_errors(default: str | None) -> dict:
    """The app's exception handlers, reshaped into the request's dialect: `default` for a route of one
    dialect, or what the handler found in the body (request.state.rerank_dialect) on /rerank."""

    def wrap(base: Callable[[Request, Any], Response]) -> Callable[[Request, Any], Response]:
        def handler(request: Request, exc: Exception) -> Response:
            response = base(request, exc)
            shape = ERROR_SHAPES.get(getattr(request.state, "rerank_dialect", None) or default or "")
            if shape is None:
                return response
            content = response.content
            message = content.get("message", "") if isinstance(content, dict) else str(content)
            status, body = shape(response.status_code, message, exc)
            return Response(body, status_code=status, headers=dict(response.headers), media_type=MediaType.JSON)

        return handler

    return {kind: wrap(base) for kind, base in EXCEPTION_HANDLERS.items()}


@post("/voyage/v1/rerank", status_code=200, summary="Rerank (Voyage AI)", exception_handlers=_dialect_errors("voyage"))
async def rerank_voyage(
    request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore, data: voyage.VoyageRerankRequest
) -> Response[voyage.VoyageRerankResponse]:
    internal = voyage.to_internal(data, max_documents=service.registry.server.max_documents)
    routed = await pipeline.rerank(request, service, internal, caller=caller, limiter=limiter, usage=usage)
    return Response(voyage.to_response(data, routed.result), headers=pipeline.headers(routed), media_type=MediaType.JSON)


@post("/tei/rerank", status_code=200, summary="Rerank (Hugging Face TEI)", exception_handlers=_dialect_errors("tei"))
async def rerank_tei(
    request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore, data: tei.TeiRerankRequest
) -> Response[list[tei.Rank]]:
    return await _tei(request, service, data, caller=caller, limiter=limiter, usage=usage)


@post(
    "/rerank",
    status_code=200,
    summary="Rerank: Cohere v1 / Jina body (`documents`), or TEI's (`texts`), answered in the same dialect",
    exception_handlers=_dialect_errors(None),
)
async def rerank_bare(request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore) -> Response:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid request: the body is not JSON: {exc}") from None
    is_tei = isinstance(body, dict) and "texts" in body and "documents" not in body
    if is_tei:
        request.state.rerank_dialect = "tei"
    kind = tei.TeiRerankRequest if is_tei else cohere.CohereRerankRequest
    try:
        data = msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}") from None
    if is_tei:
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


HANDLERS = [rerank_voyage, rerank_tei, rerank_bare]
