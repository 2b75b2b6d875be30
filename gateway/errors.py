"""Typed errors and the one error shape every API dialect answers with (Cohere's {"id", "message"})."""

from __future__ import annotations

import logging
import uuid

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

log = logging.getLogger("rerank_gateway")


class GatewayError(Exception):
    """An error with an HTTP status that a client can act on."""

    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(GatewayError):
    status_code = 400


class Unauthorized(GatewayError):
    status_code = 401


class Forbidden(GatewayError):
    status_code = 403


class NotFound(GatewayError):
    status_code = 404


class PayloadTooLarge(GatewayError):
    status_code = 413


class TooManyRequests(GatewayError):
    status_code = 429

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s + 0.999)))})
        self.retry_after_s = retry_after_s


class ModelUnavailable(GatewayError):
    """The model exists but cannot answer now (loading, failed to load, stopped)."""

    status_code = 503


class InferenceFailed(GatewayError):
    """A request that cannot be computed, e.g. a single pair that does not fit in device memory."""

    status_code = 503


class Timeout(GatewayError):
    status_code = 504


class ServiceUnavailable(GatewayError):
    """A part the gateway needs besides the model is down (the shared limits store under a fail-closed
    policy, the usage ledger)."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s + 0.999)))})


def error_body(message: str) -> dict[str, str]:
    return {"id": str(uuid.uuid4()), "message": message}


def gateway_error_handler(_: Request, exc: GatewayError) -> Response:
    return Response(error_body(exc.message), status_code=exc.status_code, headers=exc.headers, media_type=MediaType.JSON)


def http_exception_handler(_: Request, exc: HTTPException) -> Response:
    message = exc.detail
    extra = getattr(exc, "extra", None)
    # Litestar's validation errors carry the offending field in `extra`; say it, the client needs it.
    if isinstance(extra, list) and extra:
        parts = []
        for item in extra:
            if isinstance(item, dict):
                key, msg = item.get("key"), item.get("message")
                parts.append(f"{key}: {msg}" if key else str(msg))
        if parts:
            message = f"invalid request: {'; '.join(parts)}"
    elif exc.status_code == 413:
        message = "request body is larger than the server accepts"
    return Response(error_body(message), status_code=exc.status_code, headers=exc.headers or None, media_type=MediaType.JSON)


def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(error_body(f"internal error: {type(exc).__name__}"), status_code=500, media_type=MediaType.JSON)


EXCEPTION_HANDLERS = {
    GatewayError: gateway_error_handler,
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}
