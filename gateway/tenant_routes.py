"""What a tenant asks about its own account: the models it may use, its usage, and a route's report."""

from __future__ import annotations

import datetime
from typing import Annotated

import msgspec
from litestar import Request, get
from litestar.params import Parameter

from core.config import Registry
from core.errors import BadRequest, Forbidden, NotFound, Unauthorized
from gateway import schemas
from gateway.http_errors import AUTH_ERRORS, error_responses
from serving.pipeline import RerankPipeline
from tenancy import auth
from tenancy.caller import Caller
from tenancy.usage import total


@get("/v1/models", summary="Models the caller may use, with their state", responses=error_responses(*AUTH_ERRORS))
async def list_models(pipeline: RerankPipeline, caller: Caller) -> schemas.ModelList:
    models = [msgspec.convert(m, schemas.ModelInfo) for m in pipeline.pool.describe() if auth.may_use(caller, m["id"])]
    return schemas.ModelList(object="list", data=models)


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
async def route_report(request: Request, pipeline: RerankPipeline, name: str) -> schemas.RouteReport:
    registry = pipeline.registry
    if _is_admin(request, registry):
        visible = sorted(registry.routes)
    else:
        caller = auth.authenticate(request.headers, registry)
        visible = sorted(r for r in registry.routes if caller.models is None or r in caller.models)
    # A route the caller may not use answers exactly as one that does not exist.
    if name not in visible:
        raise NotFound(f"route {name!r} not found; routes: {', '.join(visible) or 'none'}")
    return msgspec.convert(pipeline.shadows.report(name, registry.routes[name]), schemas.RouteReport)


DateParameter = Parameter(description="A UTC day, YYYY-MM-DD (inclusive)", schema_extra={"format": "date"})


@get("/v1/usage", summary="The caller's usage by day and model", responses=error_responses(400, *AUTH_ERRORS))
async def my_usage(
    caller: Caller,
    pipeline: RerankPipeline,
    since: Annotated[str | None, DateParameter] = None,
    until: Annotated[str | None, DateParameter] = None,
) -> schemas.TenantUsage:
    rows = await pipeline.usage.rows(caller.tenant, utc_day(since, "since"), utc_day(until, "until"))
    return schemas.TenantUsage(object="usage", tenant=caller.tenant, data=rows, total=total(rows))


def utc_day(value: str | None, name: str) -> str | None:
    """A real calendar day as YYYY-MM-DD (2020-13-45 is not one)."""
    if value is None:
        return None
    try:
        if len(value) != 10:
            raise ValueError
        return datetime.date.fromisoformat(value).isoformat()
    except ValueError:
        raise BadRequest(f"invalid request: {name} must be a date as YYYY-MM-DD, got {value[:40]!r}") from None


HANDLERS = [list_models, route_report, my_usage]
