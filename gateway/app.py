"""The Litestar application: HTTP in, dialect -> internal request -> service -> dialect out."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from gateway import routing
from gateway.auth import require_admin
from gateway.config import Registry, cuda_device_name, detect_gpu_type
from gateway.errors import NotFound
from gateway.http_errors import EXCEPTION_HANDLERS
from gateway.metrics import Metrics
from gateway.models import ModelPool
from gateway.protocol import cohere
from gateway.reload import Reloader
from gateway.service import Caller, RerankService
from gateway.shadow import ShadowRecorder
from gateway.types import RerankResult

log = logging.getLogger("rerank_gateway")


def _service(state: State) -> RerankService:
    return state.service


async def _wait_disconnect(request: Request) -> None:
    """Resolves when the client goes away. The body is already read, so the next ASGI message on this
    connection is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _run_rerank(request: Request, service: RerankService, data: cohere.CohereRerankRequest, api_version: str) -> Response:
    internal = cohere.to_internal(data, max_documents=service.registry.server.max_documents)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        routed = await routing.rerank_routed(
            service,
            request.app.state.shadows,
            internal,
            caller=Caller(),
            user=request.headers.get(routing.USER_HEADER),
            variant=request.headers.get(routing.VARIANT_HEADER),
            # Open gateway: anyone may force any variant. The tenant's model allow-list plugs in here.
            allowed=lambda model_id: True,
            disconnected=watcher,
        )
    finally:
        watcher.cancel()
    body = cohere.to_response(data, routed.result, api_version=api_version)
    return Response(body, headers=_timing_headers(routed.result) | routed.headers(), media_type=MediaType.JSON)


def _timing_headers(result: RerankResult) -> dict[str, str]:
    # As TEI does: where the time went, in milliseconds.
    return {
        "x-queue-time": f"{result.queue_s * 1000:.2f}",
        "x-tokenize-time": f"{result.tokenize_s * 1000:.2f}",
        "x-inference-time": f"{result.inference_s * 1000:.2f}",
        "x-compute-tokens": str(result.total_tokens),
        "x-rerank-model": result.model,
    }


@post(["/v1/rerank", "/rerank"], status_code=200, summary="Rerank (Cohere v1 / Jina)")
async def rerank_v1(request: Request, service: RerankService, data: cohere.CohereRerankRequest) -> Response:
    return await _run_rerank(request, service, data, "1")


@post("/v2/rerank", status_code=200, summary="Rerank (Cohere v2)")
async def rerank_v2(request: Request, service: RerankService, data: cohere.CohereRerankRequest) -> Response:
    return await _run_rerank(request, service, data, "2")


@get("/v1/models", summary="Models this gateway serves, with their state")
async def list_models(service: RerankService) -> dict[str, Any]:
    return {"object": "list", "data": [e.describe() for e in service.pool.entries.values()]}


@get("/v1/routes/{name:str}/report", summary="A route's traffic, fallbacks and shadow agreement")
async def route_report(request: Request, service: RerankService, name: str) -> dict[str, Any]:
    route = service.registry.routes.get(name)
    if route is None:
        raise NotFound(f"route {name!r} not found; routes: {', '.join(sorted(service.registry.routes)) or 'none'}")
    return request.app.state.shadows.report(name, route)


@post("/admin/reload", status_code=200, summary="Reload the registry file; refused whole when invalid")
async def admin_reload(request: Request, service: RerankService) -> dict[str, Any]:
    require_admin(request, service.registry)
    return await request.app.state.reloader.reload(request.app.state)


@get("/health", summary="The process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", summary="Every eagerly loaded model is ready")
async def ready(service: RerankService) -> Response:
    models = {e.model_id: e.state for e in service.pool.entries.values() if e.spec.load == "eager"}
    ok = service.pool.ready
    return Response({"ready": ok, "models": models}, status_code=200 if ok else 503, media_type=MediaType.JSON)


@get("/metrics", media_type="text/plain; version=0.0.4", summary="Prometheus metrics")
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

    return Litestar(
        route_handlers=[rerank_v1, rerank_v2, list_models, route_report, admin_reload, health, ready, metrics],
        dependencies={"service": Provide(_service, sync_to_thread=False)},
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=registry.server.max_body_bytes,
        openapi_config=OpenAPIConfig(title="rerank-gateway", version="0.1.0", path="/schema"),
    )

