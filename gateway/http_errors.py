"""Litestar exception handlers: every error leaves as the one shape in core.errors.error_body."""

from __future__ import annotations

import logging

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

from core.errors import GatewayError, error_body

log = logging.getLogger("rerank_gateway")


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


def invalid_utf8_handler(_: Request, exc: UnicodeDecodeError) -> Response:
    # Litestar decodes JSON bodies before our handlers run; invalid UTF-8 surfaces here.
    return Response(error_body(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}"), status_code=400, media_type=MediaType.JSON)


def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(error_body(f"internal error: {type(exc).__name__}"), status_code=500, media_type=MediaType.JSON)


EXCEPTION_HANDLERS = {
    GatewayError: gateway_error_handler,
    HTTPException: http_exception_handler,
    UnicodeDecodeError: invalid_utf8_handler,
    Exception: internal_error_handler,
}
