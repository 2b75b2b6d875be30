"""The rerank routes of every dialect: Cohere's /v1/rerank and /v2/rerank (Jina's too), Voyage's, TEI's, and
the bare /rerank that Jina-, Cohere- and TEI-shaped clients all post to (a body with `texts` and no
`documents` is TEI's).

Each handler is a thin adapter: its dialect's body -> RerankRequest -> the one pipeline call (`RerankCall`)
-> its dialect's answer. The call is made here, at the HTTP edge, as a task that the client going away (or
the drain deadline passing) cancels: the pipeline and the engine below it never see the connection.

Every route checks its body strictly (gateway.strict_json) and answers errors in its dialect through the
one error mechanism (gateway.http_errors): Voyage's and TEI's routes name their `ErrorDialect`, /rerank
picks Cohere's or TEI's once the body says which it is. A limit, a missing model or a bad field thus says
the same thing in every dialect, in that dialect's shape (and for TEI, its status)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Union

import msgspec
from litestar import MediaType, Request, Response, post
from litestar.openapi.spec import OpenAPIMediaType, Operation, Reference, RequestBody, Schema

from core.errors import ClientClosedRequest, ServiceUnavailable
from core.rerank import RerankRequest
from dialects import cohere, tei, voyage
from gateway import strict_json
from gateway.http_errors import COHERE, RERANK_ERRORS, dialect_opt, error_responses, use_dialect
from server.lifecycle import Lifecycle
from serving.pipeline import RequestContext, RerankPipeline, Routed
from serving.routing import USER_HEADER, VARIANT_HEADER
from tenancy.caller import queued_as


def request_context(request: Request, pipeline: RerankPipeline) -> RequestContext:
    """The `context` dependency: the authenticated caller (ApiKeyAuth) and what the headers ask for."""
    caller = request.user
    tenant = pipeline.registry.tenants.get(caller.tenant)
    headers = request.headers
    return RequestContext(
        caller, queued_as(caller, tenant, headers), user=headers.get(USER_HEADER), variant=headers.get(VARIANT_HEADER)
    )


class RerankCall:
    """The `rerank` dependency: a handler's one call into the pipeline for this request."""

    def __init__(self, request: Request, pipeline: RerankPipeline, context: RequestContext, lifecycle: Lifecycle) -> None:
        self.request = request
        self.pipeline = pipeline
        self.context = context
        self.lifecycle = lifecycle
        self.max_documents = pipeline.registry.server.max_documents

    async def __call__(self, internal: RerankRequest) -> Routed:
        """The pipeline's answer. A client that goes away cancels it (ClientClosedRequest, 499 in logs and
        metrics); so does the server's drain deadline (503: its queued work was dropped, retry elsewhere)."""
        call = asyncio.ensure_future(self.pipeline.rerank(internal, self.context))
        gone = asyncio.ensure_future(_client_gone(self.request, self.lifecycle))
        try:
            await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
        if not call.cancelled():
            return call.result()
        if self.lifecycle.expired.is_set():
            raise ServiceUnavailable("the server is shutting down and dropped this request's queued work; retry on another replica")
        raise ClientClosedRequest("client closed the request; its queued work was dropped")


async def _client_gone(request: Request, lifecycle: Lifecycle) -> None:
    """Resolves when the client goes away, or when the server's drain deadline passes. The body is already
    read, so the next ASGI message on this connection is the disconnect."""

    async def disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    waiters = {asyncio.ensure_future(disconnect()), asyncio.ensure_future(lifecycle.expired.wait())}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def reply(body: Any, routed: Routed) -> Response:
    return Response(body, headers=routed.headers(), media_type=MediaType.JSON)


_STRICT_COHERE = strict_json.strict_body(cohere.CohereRerankRequest)


@post(
    "/v1/rerank", status_code=200, summary="Rerank (Cohere v1 / Jina)",
    before_request=_STRICT_COHERE, responses=error_responses(*RERANK_ERRORS),
)
async def rerank_v1(data: cohere.CohereRerankRequest, rerank: RerankCall) -> Response[cohere.CohereRerankResponse]:
    routed = await rerank(cohere.to_internal(data, max_documents=rerank.max_documents))
    return reply(cohere.to_response(data, routed.result, api_version="1"), routed)


@post(
    "/v2/rerank", status_code=200, summary="Rerank (Cohere v2)",
    before_request=_STRICT_COHERE, responses=error_responses(*RERANK_ERRORS),
)
async def rerank_v2(data: cohere.CohereRerankRequest, rerank: RerankCall) -> Response[cohere.CohereRerankResponse]:
    routed = await rerank(cohere.to_internal(data, max_documents=rerank.max_documents))
    return reply(cohere.to_response(data, routed.result, api_version="2"), routed)


@post(
    "/voyage/v1/rerank", status_code=200, summary="Rerank (Voyage AI)",
    before_request=strict_json.strict_body(voyage.VoyageRerankRequest),
    opt=dialect_opt(voyage.ERRORS), responses=error_responses(*RERANK_ERRORS, dialect=voyage.ERRORS),
)
async def rerank_voyage(data: voyage.VoyageRerankRequest, rerank: RerankCall) -> Response[voyage.VoyageRerankResponse]:
    routed = await rerank(voyage.to_internal(data, max_documents=rerank.max_documents))
    return reply(voyage.to_response(data, routed.result), routed)


@post(
    "/tei/rerank", status_code=200, summary="Rerank (Hugging Face TEI)",
    before_request=strict_json.strict_body(tei.TeiRerankRequest),
    opt=dialect_opt(tei.ERRORS), responses=error_responses(*RERANK_ERRORS, dialect=tei.ERRORS),
)
async def rerank_tei(data: tei.TeiRerankRequest, rerank: RerankCall) -> Response[list[tei.Rank]]:
    routed = await rerank(tei.to_internal(data, max_documents=rerank.max_documents))
    return reply(tei.to_response(data, routed.result), routed)


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
async def rerank_bare(request: Request, rerank: RerankCall) -> Response[Union[cohere.CohereRerankResponse, list[tei.Rank]]]:
    data = request.state[_BARE_BODY]
    if isinstance(data, tei.TeiRerankRequest):
        routed = await rerank(tei.to_internal(data, max_documents=rerank.max_documents))
        return reply(tei.to_response(data, routed.result), routed)
    routed = await rerank(cohere.to_internal(data, max_documents=rerank.max_documents))
    return reply(cohere.to_response(data, routed.result, api_version="1"), routed)


HANDLERS = [rerank_v1, rerank_v2, rerank_voyage, rerank_tei, rerank_bare]
