"""The rerank routes of every dialect: Cohere's /v1/rerank and /v2/rerank (Jina's too), Voyage's, TEI's, and
the bare /rerank that Jina-, Cohere- and TEI-shaped clients all post to (a body with `texts` and no
`documents` is TEI's).

Each handler is a thin adapter: its dialect's body -> RerankRequest -> the one pipeline call (`RerankCall`)
-> its dialect's answer. The call is made here, at the HTTP edge, as a task that the client going away (or
the drain deadline passing) cancels: the pipeline and the engine below it never see the connection.

Each dialect has a router that sets, once for its routes, the strict decode of the body (gateway.strict_json:
decoded once, into the handler's `data`) and the dialect's error shape (gateway.http_errors); /rerank
picks Cohere's or TEI's once the body says which it is. A limit, a missing model or a bad field thus says
the same thing in every dialect, in that dialect's shape (and for TEI, its status)."""

from __future__ import annotations

import asyncio
from typing import Any, Union

import msgspec
from litestar import MediaType, Request, Response, Router, post
from litestar.di import Provide
from litestar.openapi.spec import Schema
from litestar.typing import FieldDefinition

from core.errors import ClientClosedRequest, ServiceUnavailable
from core.rerank import RerankRequest
from dialects import cohere, tei, voyage
from dialects.errors import ErrorDialect
from gateway import strict_json
from gateway.http_errors import COHERE, RERANK_ERRORS, dialect_opt, error_responses, use_dialect
from gateway.strict_json import StrictBody
from server.lifecycle import Lifecycle
from serving.pipeline import RequestContext, RerankPipeline, Routed
from serving.routing import USER_HEADER, VARIANT_HEADER
from tenancy.caller import queued_as


def request_context(request: Request, pipeline: RerankPipeline) -> RequestContext:
    """The authenticated caller (ApiKeyAuth) and what the headers ask for."""
    caller = request.user
    tenant = pipeline.registry.tenants.get(caller.tenant)
    headers = request.headers
    return RequestContext(
        caller, queued_as(caller, tenant, headers), user=headers.get(USER_HEADER), variant=headers.get(VARIANT_HEADER)
    )


class RerankCall:
    """The `rerank` dependency: a handler's one call into the pipeline for this request."""

    def __init__(self, request: Request, pipeline: RerankPipeline, lifecycle: Lifecycle) -> None:
        self.request = request
        self.pipeline = pipeline
        self.context = request_context(request, pipeline)
        self.lifecycle = lifecycle
        self.max_documents = pipeline.registry.server.max_documents

    async def __call__(self, internal: RerankRequest) -> Routed:
        """The pipeline's answer. A client that goes away cancels it (ClientClosedRequest, 499 in logs and
        metrics); so does the server's drain deadline (503: its queued work was dropped, retry elsewhere).
        If this handler is cancelled itself, the call is cancelled with it and waited for."""
        call = asyncio.ensure_future(self.pipeline.rerank(internal, self.context))
        gone = asyncio.ensure_future(_disconnected(self.request))
        gone.add_done_callback(lambda _: call.cancel())
        forget = self.lifecycle.on_expire(call.cancel)
        try:
            return await call
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this handler was cancelled: not the client's doing nor the drain's
            if self.lifecycle.expired:
                raise ServiceUnavailable("the server is shutting down and dropped this request's queued work; retry on another replica") from None
            raise ClientClosedRequest("client closed the request; its queued work was dropped") from None
        finally:
            forget()
            gone.cancel()


async def _disconnected(request: Request) -> None:
    """Resolves when the client goes away. The body is already read, so the next ASGI message on this
    connection is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def reply(body: Any, routed: Routed) -> Response:
    return Response(body, headers=routed.headers(), media_type=MediaType.JSON)


# Each dialect's router sets its error shape and the strict decode once, for all of its routes (routes()).
@post("/v1/rerank", status_code=200, summary="Rerank (Cohere v1 / Jina)", responses=error_responses(*RERANK_ERRORS))
async def rerank_v1(data: cohere.CohereRerankRequest, rerank: RerankCall) -> Response[cohere.CohereRerankResponse]:
    routed = await rerank(cohere.to_internal(data, max_documents=rerank.max_documents))
    return reply(cohere.to_response(data, routed.result, api_version="1"), routed)


@post("/v2/rerank", status_code=200, summary="Rerank (Cohere v2)", responses=error_responses(*RERANK_ERRORS))
async def rerank_v2(data: cohere.CohereRerankRequest, rerank: RerankCall) -> Response[cohere.CohereRerankResponse]:
    routed = await rerank(cohere.to_internal(data, max_documents=rerank.max_documents))
    return reply(cohere.to_response(data, routed.result, api_version="2"), routed)


@post("/v1/rerank", status_code=200, summary="Rerank (Voyage AI)", responses=error_responses(*RERANK_ERRORS, dialect=voyage.ERRORS))
async def rerank_voyage(data: voyage.VoyageRerankRequest, rerank: RerankCall) -> Response[voyage.VoyageRerankResponse]:
    routed = await rerank(voyage.to_internal(data, max_documents=rerank.max_documents))
    return reply(voyage.to_response(data, routed.result), routed)


@post("/rerank", status_code=200, summary="Rerank (Hugging Face TEI)", responses=error_responses(*RERANK_ERRORS, dialect=tei.ERRORS))
async def rerank_tei(data: tei.TeiRerankRequest, rerank: RerankCall) -> Response[list[tei.Rank]]:
    routed = await rerank(tei.to_internal(data, max_documents=rerank.max_documents))
    return reply(tei.to_response(data, routed.result), routed)


class _Shape(msgspec.Struct):
    # Only which keys are there; Raw leaves their values undecoded.
    texts: msgspec.Raw = msgspec.Raw(b"")
    documents: msgspec.Raw = msgspec.Raw(b"")


class BareBody(StrictBody):
    """The DTO of /rerank, whose body says its dialect: TEI's has `texts` and no `documents`, anything else
    is Cohere's v1 (Jina's). It finds which from the keys alone (their values are skipped, not decoded),
    answers errors in that dialect from then on, and decodes the body strictly into that dialect's request."""

    def decode_bytes(self, value: bytes) -> Any:
        strict_json.check_body(value, strict_json.max_json_depth(self.connection))
        kind: type = cohere.CohereRerankRequest
        try:
            shape = msgspec.json.decode(value, type=_Shape)
        except (msgspec.DecodeError, msgspec.ValidationError):
            shape = None  # not a JSON object: the strict decode below says so, in Cohere's shape
        if shape is not None and len(shape.texts) and not len(shape.documents):
            kind = tei.TeiRerankRequest
            use_dialect(self.connection, tei.ERRORS)
        return strict_json.decode_checked(value, kind)

    @classmethod
    def create_openapi_schema(cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any) -> Any:
        # Either body, each by its component: Cohere v1 / Jina (`documents`), or TEI's (`texts`, no `documents`).
        kinds = (cohere.CohereRerankRequest, tei.TeiRerankRequest)
        return Schema(any_of=[schema_creator.for_field_definition(FieldDefinition.from_annotation(k)) for k in kinds])


@post(
    "/rerank", status_code=200, dto=BareBody,
    summary="Rerank: Cohere v1 / Jina body (`documents`), or TEI's (`texts`), answered in the same dialect",
    responses=error_responses(*RERANK_ERRORS, dialect=(COHERE, tei.ERRORS)),
)
async def rerank_bare(
    data: Union[cohere.CohereRerankRequest, tei.TeiRerankRequest], rerank: RerankCall
) -> Response[Union[cohere.CohereRerankResponse, list[tei.Rank]]]:
    if isinstance(data, tei.TeiRerankRequest):
        routed = await rerank(tei.to_internal(data, max_documents=rerank.max_documents))
        return reply(tei.to_response(data, routed.result), routed)
    routed = await rerank(cohere.to_internal(data, max_documents=rerank.max_documents))
    return reply(cohere.to_response(data, routed.result, api_version="1"), routed)


def _dialect_router(path: str, handlers: list, errors: ErrorDialect) -> Router:
    """One dialect's routes, its error shape and the strict body decode set once for all of them."""
    return Router(
        path, route_handlers=handlers, opt=dialect_opt(errors), dto=StrictBody, return_dto=None,
        before_request=strict_json.refuse_empty_body,
    )


def routes(lifecycle: Lifecycle) -> Router:
    """Every rerank route, with the dependency they share (a router per app: Litestar owns what it registers).

    One dependency on one other (the app's `pipeline`): Litestar resolves dependencies of the same depth
    concurrently, in a task group of its own, so two of them (`pipeline` and `lifecycle` beside each
    other) cost every request two tasks and a checkpoint: ~350 of its ~1,700 Python calls on the event loop
    (bench.event_loop)."""

    def rerank_call(request: Request, pipeline: RerankPipeline) -> RerankCall:
        return RerankCall(request, pipeline, lifecycle)

    return Router(
        "/",
        route_handlers=[
            _dialect_router("/", [rerank_v1, rerank_v2, rerank_bare], COHERE),
            _dialect_router("/voyage", [rerank_voyage], voyage.ERRORS),
            _dialect_router("/tei", [rerank_tei], tei.ERRORS),
        ],
        dependencies={"rerank": Provide(rerank_call, sync_to_thread=False)},
    )
