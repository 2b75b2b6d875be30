"""The Litestar application: HTTP in, dialect -> internal request -> service -> dialect out."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.openapi import OpenAPIConfig

from gateway import auth, dialect_routes, pipeline
from core.config import Registry, cuda_device_name, detect_gpu_type
from core.errors import BadRequest, NotFound
from gateway.http_errors import EXCEPTION_HANDLERS
from gateway.limits import Limiter, build_limiter
from gateway.metrics import Metrics
from gateway.models import ModelPool
from gateway.protocol import cohere
from gateway.reload import Reloader
from gateway.service import Caller, RerankService
from gateway.shadow import ShadowRecorder
from gateway.usage import UsageStore, total

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
    """Dialect -> internal request -> gateway.pipeline -> dialect."""
    internal = cohere.to_internal(data, max_documents=service.registry.server.max_documents)
    routed = await pipeline.rerank(request, service, internal, caller=caller, limiter=limiter, usage=usage)
    body = cohere.to_response(data, routed.result, api_version=api_version)
    return Response(body, headers=pipeline.headers(routed), media_type=MediaType.JSON)


@post("/v1/rerank", status_code=200, summary="Rerank (Cohere v1 / Jina)")
async def rerank_v1(
    request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore, data: cohere.CohereRerankRequest
) -> Response:
    return await _run_rerank(request, service, data, "1", caller=caller, limiter=limiter, usage=usage)


@post("/v2/rerank", status_code=200, summary="Rerank (Cohere v2)")
async def rerank_v2(
    request: Request, service: RerankService, caller: Caller, limiter: Limiter, usage: UsageStore, data: cohere.CohereRerankRequest
) -> Response:
    return await _run_rerank(request, service, data, "2", caller=caller, limiter=limiter, usage=usage)


@get("/v1/models", summary="Models the caller may use, with their state")
async def list_models(service: RerankService, caller: Caller) -> dict[str, Any]:
    entries = [e for e in service.pool.entries.values() if auth.may_use(caller, e.model_id)]
    return {"object": "list", "data": [e.describe() for e in entries]}


@get("/v1/routes/{name:str}/report", summary="A route's traffic, fallbacks and shadow agreement")
async def route_report(request: Request, service: RerankService, name: str) -> dict[str, Any]:
    route = service.registry.routes.get(name)
    if route is None:
        raise NotFound(f"route {name!r} not found; routes: {', '.join(sorted(service.registry.routes)) or 'none'}")
    return request.app.state.shadows.report(name, route)


@post("/admin/reload", guards=[admin_guard], status_code=200, summary="Reload the registry file; refused whole when invalid")
async def admin_reload(request: Request) -> dict[str, Any]:
    return await request.app.state.reloader.reload(request.app.state)


@get("/v1/usage", summary="The caller's usage by day and model")
async def my_usage(caller: Caller, usage: UsageStore, since: str | None = None, until: str | None = None) -> dict[str, Any]:
    rows = await usage.rows(caller.tenant, _date(since, "since"), _date(until, "until"))
    return {"object": "usage", "tenant": caller.tenant, "data": rows, "total": total(rows)}


@get("/admin/usage", guards=[admin_guard], summary="Every tenant's usage (admin key)")
async def all_usage(
    usage: UsageStore, tenant: str | None = None, since: str | None = None, until: str | None = None
) -> dict[str, Any]:
    rows = await usage.rows(tenant, _date(since, "since"), _date(until, "until"))
    return {"object": "usage", "data": rows, "total": total(rows)}


def _date(value: str | None, name: str) -> str | None:
    if value is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise BadRequest(f"invalid request: {name} must be a date as YYYY-MM-DD")
    return value


@get("/health", exclude_from_auth=True, summary="The process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", exclude_from_auth=True, summary="Every eagerly loaded model is ready")
async def ready(service: RerankService, limiter: Limiter) -> Response:
    models = {e.model_id: e.state for e in service.pool.entries.values() if e.spec.load == "eager"}
    ok = service.pool.ready
    # Limits degrade without making the gateway unready: on_failure says whether it still serves.
    body = {"ready": ok, "models": models, "limits": await limiter.status()}
    return Response(body, status_code=200 if ok else 503, media_type=MediaType.JSON)


@get("/metrics", exclude_from_auth=True, media_type="text/plain; version=0.0.4", summary="Prometheus metrics")
async def metrics(service: RerankService) -> bytes:
    for model_id, entry in service.pool.entries.items():
        if entry.scheduler is not None:
            pairs, tokens = entry.scheduler.queue_depth()
            service.metrics.queue_pairs.labels(model_id).set(pairs)
            service.metrics.queue_tokens.labels(model_id).set(tokens)
    return service.metrics.render()


def create_app(
    registry: Registry,
    *,
    gpu_type: str | None = None,
    wait_for_models: bool = False,
    registry_path: str | Path | None = None,
    reload_on_sighup: bool = False,
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

    return Litestar(
        route_handlers=[
            rerank_v1, rerank_v2, *dialect_routes.HANDLERS, list_models, route_report, my_usage, all_usage, admin_reload, health, ready, metrics,
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
        openapi_config=OpenAPIConfig(title="rerank-gateway", version="0.1.0", path="/schema"),
    )

