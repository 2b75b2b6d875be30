"""The operator's routes: registry reload and every tenant's usage (admin key), probes and metrics (no key)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import MediaType, Response, get, post
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec

from gateway import schemas
from gateway.http_errors import ADMIN_ERRORS, error_responses
from gateway.tenant_routes import DateParameter, utc_day
from server.lifecycle import Lifecycle
from serving.pipeline import RerankPipeline
from serving.reload import Reloader
from tenancy import auth
from tenancy.usage import total


def admin_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    auth.require_admin(connection, connection.app.state.pipeline.registry)


@post(
    "/admin/reload", guards=[admin_guard], status_code=200, summary="Reload the registry file; refused whole when invalid",
    responses=error_responses(400, *ADMIN_ERRORS),
)
async def admin_reload(reloader: Reloader) -> schemas.ReloadOutcome:
    return msgspec.convert(await reloader.reload(), schemas.ReloadOutcome)


@get("/admin/usage", guards=[admin_guard], summary="Every tenant's usage (admin key)", responses=error_responses(400, *ADMIN_ERRORS))
async def all_usage(
    pipeline: RerankPipeline,
    tenant: str | None = None,
    since: Annotated[str | None, DateParameter] = None,
    until: Annotated[str | None, DateParameter] = None,
) -> schemas.AllUsage:
    rows = await pipeline.usage.rows(tenant, utc_day(since, "since"), utc_day(until, "until"))
    return schemas.AllUsage(object="usage", data=rows, total=total(rows))


# Probes and metrics need no key: `security=[{}]` says so in the OpenAPI document.
@get("/health", exclude_from_auth=True, security=[{}], summary="The process is alive")
async def health() -> schemas.Health:
    return schemas.Health(status="ok")


@get(
    "/ready", exclude_from_auth=True, security=[{}], summary="Every eagerly loaded model is ready, and the server is not draining",
    responses={503: ResponseSpec(schemas.Readiness, description="Not ready: a model is loading or failed, or the server is draining")},
)
async def ready(pipeline: RerankPipeline, lifecycle: Lifecycle) -> Response[schemas.Readiness]:
    models = pipeline.pool.eager_states()
    draining = lifecycle.draining
    ok = pipeline.pool.ready and not draining
    # Limits degrade without making the gateway unready: on_failure says whether it still serves.
    body = schemas.Readiness(ready=ok, draining=draining, models=models, limits=await pipeline.limiter.status())
    return Response(body, status_code=200 if ok else 503, media_type=MediaType.JSON)


@get("/metrics", exclude_from_auth=True, security=[{}], media_type="text/plain; version=0.0.4", summary="Prometheus metrics")
async def metrics(pipeline: RerankPipeline) -> bytes:
    for model_id, pairs, tokens in pipeline.pool.queue_depths():
        pipeline.metrics.queue_pairs.labels(model_id).set(pairs)
        pipeline.metrics.queue_tokens.labels(model_id).set(tokens)
    return pipeline.metrics.render()


HANDLERS = [admin_reload, all_usage, health, ready, metrics]
