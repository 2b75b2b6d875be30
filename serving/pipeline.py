"""What every rerank route does between its dialect's decoding and encoding: internal request -> access
check -> limits -> route -> model -> usage ledger. One copy, whatever dialect the client speaks."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re

from litestar import Request

from core.errors import ClientClosedRequest, ServiceUnavailable
from serving import routing, service as rerank_service
from tenancy import auth
from tenancy.limits import Limiter, OverLimit
from dialects.upstream import TENANT_HEADER, TENANT_WEIGHT_HEADER
from serving.routing import Routed
from tenancy.caller import Caller
from serving.service import RerankService
from core.rerank import RerankRequest, RerankResult, max_scored_units, search_units
from tenancy.usage import UsageStore


async def _wait_disconnect(request: Request) -> None:
    """Resolves when the client goes away, or when the server's drain deadline passes (then the request's
    queued pairs are dropped as for a disconnect, and it is answered 503). The body is already read, so
    the next ASGI message on this connection is the disconnect."""

    async def disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    waiters = {asyncio.ensure_future(disconnect()), asyncio.ensure_future(request.app.state.lifecycle.expired.wait())}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def rerank(
    request: Request,
    service: RerankService,
    internal: RerankRequest,
    *,
    caller: Caller,
    limiter: Limiter,
    usage: UsageStore,
) -> Routed:
    auth.check_model_access(caller, internal.model or service.registry.default_model, service.registry)
    queued_as = forwarded_tenant(request, service, caller)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        tenant = service.registry.tenants.get(caller.tenant)
        # Quota is reserved for the most chunks the request can become (core.rerank.max_scored_units).
        async with limiter.hold(caller.tenant, tenant, search_units(max_scored_units(internal))) as lease:
            routed = await rerank_service.rerank_routed(
                service,
                request.app.state.shadows,
                internal,
                caller=queued_as,
                user=request.headers.get(routing.USER_HEADER),
                variant=request.headers.get(routing.VARIANT_HEADER),
                # A forced variant must be a model the caller may use by name.
                allowed=lambda model_id: auth.may_use(caller, model_id),
                disconnected=watcher,
            )
            result = routed.result
            lease.used_units = search_units(result.scored_units)
            # Recorded before the answer leaves: what was acknowledged is in the ledger.
            await usage.record(
                caller.tenant, result.model, documents=len(internal.texts), search_units=lease.used_units, tokens=result.total_tokens
            )
    except OverLimit as exc:
        service.metrics.limited.labels(exc.tenant, exc.which).inc()
        raise
    except ClientClosedRequest:
        if request.app.state.lifecycle.expired.is_set():
            raise ServiceUnavailable("the server is shutting down and dropped this request's queued work; retry on another replica") from None
        raise
    finally:
        watcher.cancel()
    return routed


_TENANT_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


def forwarded_tenant(request: Request, service: RerankService, caller: Caller) -> Caller:
    """The caller a request queues as. A tenant marked `forwards_tenants` (a front door) may name the
    tenant behind each request: it queues as "<front door>/<tenant>" with that tenant's weight, so the
    front door's tenants share this gateway's models fairly. Anyone else's header is ignored."""
    name = request.headers.get(TENANT_HEADER)
    tenant = service.registry.tenants.get(caller.tenant)
    if name is None or tenant is None or not tenant.forwards_tenants or not _TENANT_NAME.fullmatch(name):
        return caller
    try:
        weight = float(request.headers.get(TENANT_WEIGHT_HEADER, caller.weight))
    except ValueError:
        weight = caller.weight
    weight = weight if math.isfinite(weight) and 0 < weight <= 1000 else caller.weight
    return dataclasses.replace(caller, tenant=f"{caller.tenant}/{name}", weight=weight)


def headers(routed: Routed) -> dict[str, str]:
    return timing_headers(routed.result) | routed.headers()


def timing_headers(result: RerankResult) -> dict[str, str]:
    # As TEI does: where the time went, in milliseconds.
    return {
        "x-queue-time": f"{result.queue_s * 1000:.2f}",
        "x-tokenize-time": f"{result.tokenize_s * 1000:.2f}",
        "x-inference-time": f"{result.inference_s * 1000:.2f}",
        "x-compute-tokens": str(result.total_tokens),
        "x-rerank-model": result.model,
    }
