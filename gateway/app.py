"""The Litestar application, built for one registry: routes, middleware, dependencies, and the lifespan
that builds what the handlers use."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from litestar import Litestar, Request
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from core.config import Registry, detect_gpu_type
from core.host import cuda_device_name
from gateway import operator_routes, rerank_routes, tenant_routes
from gateway.http_errors import EXCEPTION_HANDLERS
from observability.logs import with_request_id
from observability.metrics import Metrics
from pool.model_pool import ModelPool
from server.lifecycle import Lifecycle
from serving.pipeline import RerankPipeline, Served
from serving.reload import Reloader
from serving.shadow import ShadowRecorder
from tenancy import auth
from tenancy.caller import Caller
from tenancy.limits import build_limiter, lease_ttl_s
from tenancy.usage import UsageStore

log = logging.getLogger("rerank_gateway")


class ApiKeyAuth(AbstractAuthenticationMiddleware):
    """Resolves the API key to a Caller (request.user) before the body is read; 401 ends it there.
    Reads the registry the pipeline serves now, so a reloaded registry takes effect at once."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        caller = auth.authenticate(connection.headers, connection.app.state.pipeline.registry)
        return AuthenticationResult(user=caller, auth=None)


def _pipeline(state: State) -> RerankPipeline:
    return state.pipeline


def _reloader(state: State) -> Reloader:
    return state.reloader


def _caller(request: Request) -> Caller:
    return request.user


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

    # Driven by server.http_server on SIGTERM; a fresh one (never draining) under any other server.
    lifecycle = lifecycle or Lifecycle()

    @asynccontextmanager
    async def serve_registry(app: Litestar) -> AsyncIterator[None]:
        """Builds the pipeline and what it runs on; closes them in reverse at shutdown."""
        metrics = Metrics()
        limiter = build_limiter(registry.limits, lease_ttl_s=lease_ttl_s(registry.server))
        usage = await UsageStore(registry.usage.path).open()
        pool = ModelPool(registry, gpu_type, metrics)
        pipeline = RerankPipeline(Served(registry, pool), limiter=limiter, usage=usage, shadows=ShadowRecorder(metrics), metrics=metrics)
        reloader = Reloader(str(registry_path) if registry_path else None, gpu_type, pipeline)
        app.state.pipeline, app.state.reloader = pipeline, reloader
        loop = asyncio.get_running_loop()
        if reload_on_sighup:
            loop.add_signal_handler(signal.SIGHUP, reloader.reload_in_background)
        pool.start()
        if wait_for_models:
            await pool.wait_started()
        try:
            yield
        finally:
            if reload_on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await pipeline.shadows.close()
            await reloader.close()
            await pipeline.pool.close()
            await pipeline.usage.close()
            await pipeline.limiter.close()

    app = Litestar(
        route_handlers=[
            rerank_routes.routes(lifecycle), *tenant_routes.HANDLERS, *operator_routes.HANDLERS,
        ],
        dependencies={
            "pipeline": Provide(_pipeline, sync_to_thread=False),
            "reloader": Provide(_reloader, sync_to_thread=False),
            "lifecycle": Provide(lambda: lifecycle, sync_to_thread=False),
            "caller": Provide(_caller, sync_to_thread=False),
        },
        # Admin routes take the admin key instead (admin_guard / auth.require_admin).
        middleware=[DefineMiddleware(ApiKeyAuth, exclude=["^/schema", "^/admin/"])],
        lifespan=[serve_registry],
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

