"""The Litestar application: HTTP in, dialect -> internal request -> service -> dialect out."""

from __future__ import annotations

import asyncio
import logging
import datetime
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, AsyncIterator

import msgspec

from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import Parameter

from gateway import rerank_routes
from serving import pipeline
from tenancy import auth
from core.config import Registry, detect_gpu_type
from core.host import cuda_device_name
from core.errors import BadRequest, Forbidden, NotFound, Unauthorized
from gateway import schemas, strict_json
from gateway.http_errors import ADMIN_ERRORS, AUTH_ERRORS, EXCEPTION_HANDLERS, RERANK_ERRORS, error_responses
from server.lifecycle import Lifecycle
from tenancy.limits import Limiter, build_limiter
from observability.logs import with_request_id
from observability.metrics import Metrics
from pool.model_pool import ModelPool
from dialects import cohere
from serving.reload import Reloader
from tenancy.caller import Caller
from serving.service import RerankService
from serving.shadow import ShadowRecorder
from tenancy.usage import UsageStore, total

log = logging.getLogger("rerank_gateway")


def _service(state: State) -> RerankService:
    return state.service


class ApiKeyAuth(AbstractAuthenticationMiddleware):
    """Resolves the API key to a Caller (request.user) before the body is read; 401 ends it there.
    Reads the registry the service runs now, so a reloaded registry takes effect at once."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        caller = auth.authenticate(connection.headers, connection.app.state.service.registry)
        return AuthenticationResult(user=caller, auth=None)


def _caller(request: Request) -> Caller:
    return request.user


def _limiter(state: State) -> Limiter:
    return state.limiter


def _usage(state: State) -> UsageStore:
    return state.usage


def admin_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    auth.require_admin(connection, connection.app.state.service.registry)


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


# /rerank (Jina's path, also TEI's) lives in gateway.rerank_routes: its body says which dialect it is.
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


@get("/v1/models", summary="Models the caller may use, with their state", responses=error_responses(*AUTH_ERRORS))
async def list_models(service: RerankService, caller: Caller) -> schemas.ModelList:
    entries = [e for e in service.pool.entries.values() if auth.may_use(caller, e.model_id)]
    return schemas.ModelList(object="list", data=[msgspec.convert(e.describe(), schemas.ModelInfo) for e in entries])


def _is_admin(request: Request, registry: Registry) -> bool:
    try:
        auth.require_admin(request, registry)
    except (Unauthorized, Forbidden):
        return False
    return True


# Authenticated inside (not by ApiKeyAuth): the admin key, which is no tenant's key, sees every route.
@get(
    "/v1/routes/{name:str}/report", exclude_from_auth=True, summary="A route's traffic, fallbacks and shadow agreement",
    responses=error_responses(400, 401, 404),
)
async def route_report(request: Request, service: RerankService, name: str) -> schemas.RouteReport:
    registry = service.registry
    if _is_admin(request, registry):
        visible = sorted(registry.routes)
    else:
        caller = auth.authenticate(request.headers, registry)
        visible = sorted(r for r in registry.routes if caller.models is None or r in caller.models)
    # A route the caller may not use answers exactly as one that does not exist.
    if name not in visible:
        raise NotFound(f"route {name!r} not found; routes: {', '.join(visible) or 'none'}")
    return msgspec.convert(request.app.state.shadows.report(name, registry.routes[name]), schemas.RouteReport)


@post(
    "/admin/reload", guards=[admin_guard], status_code=200, summary="Reload the registry file; refused whole when invalid",
    responses=error_responses(400, *ADMIN_ERRORS),
)
async def admin_reload(request: Request) -> schemas.ReloadOutcome:
    return msgspec.convert(await request.app.state.reloader.reload(request.app.state), schemas.ReloadOutcome)


DateParameter = Parameter(description="A UTC day, YYYY-MM-DD (inclusive)", schema_extra={"format": "date"})


@get("/v1/usage", summary="The caller's usage by day and model", responses=error_responses(400, *AUTH_ERRORS))
async def my_usage(
    caller: Caller,
    usage: UsageStore,
    since: Annotated[str | None, DateParameter] = None,
    until: Annotated[str | None, DateParameter] = None,
) -> schemas.TenantUsage:
    rows = await usage.rows(caller.tenant, _date(since, "since"), _date(until, "until"))
    return schemas.TenantUsage(object="usage", tenant=caller.tenant, data=rows, total=total(rows))


@get("/admin/usage", guards=[admin_guard], summary="Every tenant's usage (admin key)", responses=error_responses(400, *ADMIN_ERRORS))
async def all_usage(
    usage: UsageStore,
    tenant: str | None = None,
    since: Annotated[str | None, DateParameter] = None,
    until: Annotated[str | None, DateParameter] = None,
) -> schemas.AllUsage:
    rows = await usage.rows(tenant, _date(since, "since"), _date(until, "until"))
    return schemas.AllUsage(object="usage", data=rows, total=total(rows))


def _date(value: str | None, name: str) -> str | None:
    """A real calendar day as YYYY-MM-DD (2020-13-45 is not one)."""
    if value is None:
        return None
    try:
        if len(value) != 10:
            raise ValueError
        return datetime.date.fromisoformat(value).isoformat()
    except ValueError:
        raise BadRequest(f"invalid request: {name} must be a date as YYYY-MM-DD, got {value[:40]!r}") from None


# Probes and metrics need no key: `security=[{}]` says so in the OpenAPI document.
@get("/health", exclude_from_auth=True, security=[{}], summary="The process is alive")
async def health() -> schemas.Health:
    return schemas.Health(status="ok")


@get(
    "/ready", exclude_from_auth=True, security=[{}], summary="Every eagerly loaded model is ready, and the server is not draining",
    responses={503: ResponseSpec(schemas.Readiness, description="Not ready: a model is loading or failed, or the server is draining")},
)
async def ready(request: Request, service: RerankService, limiter: Limiter) -> Response[schemas.Readiness]:
    models = {e.model_id: e.state for e in service.pool.entries.values() if e.spec.load == "eager"}
    draining = request.app.state.lifecycle.draining
    ok = service.pool.ready and not draining
    # Limits degrade without making the gateway unready: on_failure says whether it still serves.
    body = schemas.Readiness(ready=ok, draining=draining, models=models, limits=await limiter.status())
    return Response(body, status_code=200 if ok else 503, media_type=MediaType.JSON)


@get("/metrics", exclude_from_auth=True, security=[{}], media_type="text/plain; version=0.0.4", summary="Prometheus metrics")
async def metrics(service: RerankService) -> bytes:
    for model_id, entry in service.pool.entries.items():
        if entry.scheduler is not None:
            pairs, tokens = entry.scheduler.queue_depth()
            service.metrics.queue_pairs.labels(model_id).set(pairs)
            service.metrics.queue_tokens.labels(model_id).set(tokens)
    return service.metrics.render()


_SECURITY_SCHEMES = {
    "bearer": SecurityScheme(type="http", scheme="bearer", description="Authorization: Bearer <API key>"),
    "api_key": SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header"),
}


def create_app(
    registry: Registry,
    *,
    gpu_type: str | None = None,
    wait_for_models: bool = False,
    registry_path: str | Path | None = None,
    reload_on_sighup: bool = False,
    lifecycle: Lifecycle | None = None,
) -> Litestar:
    """Build the app for a validated registry. `gpu_type` overrides detection (tests, `plan --gpu`).
    `registry_path` is the file POST /admin/reload (and SIGHUP, with `reload_on_sighup`) re-reads."""
    gpu_type = gpu_type or detect_gpu_type(registry, cuda_device_name())

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        metrics = Metrics()
        pool = ModelPool(registry, gpu_type, metrics)
        app.state.service = RerankService(registry, pool, metrics)
        app.state.shadows = ShadowRecorder(metrics)
        app.state.reloader = reloader = Reloader(str(registry_path) if registry_path else None, gpu_type)
        # Driven by server.http_server on SIGTERM; a fresh one (never draining) under any other server.
        app.state.lifecycle = lifecycle or Lifecycle()
        loop = asyncio.get_running_loop()
        if reload_on_sighup:
            loop.add_signal_handler(signal.SIGHUP, reloader.reload_in_background, app.state)
        pool.start()
        if wait_for_models:
            await pool.wait_started()
        try:
            yield
        finally:
            if reload_on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await app.state.shadows.close()
            reloader.close()
            app.state.service.pool.close()

    @asynccontextmanager
    async def tenancy(app: Litestar) -> AsyncIterator[None]:
        app.state.limiter = build_limiter(registry.limits, lease_ttl_s=registry.server.request_timeout_s + 30)
        app.state.usage = await UsageStore(registry.usage.path).open()
        try:
            yield
        finally:
            await app.state.usage.close()
            await app.state.limiter.close()

    app = Litestar(
        route_handlers=[
            rerank_v1, rerank_v2, *rerank_routes.HANDLERS, list_models, route_report, my_usage, all_usage, admin_reload, health, ready, metrics,
        ],
        dependencies={
            "service": Provide(_service, sync_to_thread=False),
            "caller": Provide(_caller, sync_to_thread=False),
            "limiter": Provide(_limiter, sync_to_thread=False),
            "usage": Provide(_usage, sync_to_thread=False),
        },
        # Admin routes take the admin key instead (admin_guard / auth.require_admin).
        middleware=[DefineMiddleware(ApiKeyAuth, exclude=["^/schema", "^/admin/"])],
        lifespan=[tenancy, lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=registry.server.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="rerank-gateway",
            version="0.1.0",
            path="/schema",
            # Only when tenants are configured does a route need a key (ApiKeyAuth; admin routes: admin key).
            components=Components(security_schemes=_SECURITY_SCHEMES if registry.tenants else None),
            security=[{"bearer": []}, {"api_key": []}] if registry.tenants else None,
        ),
    )
    return with_request_id(app)

