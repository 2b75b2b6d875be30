"""Litestar exception handlers and the error bodies they write.

Every error leaves in the error shape of the route's dialect: a dialect's router names its `ErrorDialect` in
`opt={ERROR_DIALECT: ...}` (see `dialect_opt`), a route whose body says its dialect (/rerank) names it per
request (`use_dialect`), and routes without one (and paths that match no route) answer in Cohere's
`{"id", "message"}` (core.errors.error_body). A dialect may also answer with statuses of its own (TEI's
status follows its error type). The same dialect gives the OpenAPI document its error schema and statuses
(`error_responses`), so the document and the wire cannot disagree."""

from __future__ import annotations

import logging
from typing import Any, Union

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec

from core.errors import GatewayError
from dialects.errors import COHERE, ErrorDialect

log = logging.getLogger("rerank_gateway")

ERROR_DIALECT = "error_dialect"


# What each status means on this gateway: the OpenAPI descriptions and the README's error table.
STATUS_MEANING = {
    400: "Invalid request: malformed or empty body, wrong types, values out of range, JSON nested too deep",
    401: "Missing or unknown API key (when tenants are configured)",
    403: "Not the admin key (admin routes), or a forced variant (X-Rerank-Variant) the key may not use",
    404: "No such model, route or path (names listed are only those the caller may use)",
    405: "Method not allowed on this path",
    408: "The request headers or body were not received within the server's timeouts",
    413: "Request body larger than server.max_body_bytes",
    422: "TEI dialect: invalid request (error_type Validation or Tokenizer)",
    424: "TEI dialect: the model failed or did not finish in time (error_type Backend)",
    429: "A tenant's rate, quota or concurrency limit, or a model's queue is full (Retry-After says when)",
    431: "Request headers larger than server.max_header_bytes or more than server.max_headers",
    499: "The client closed the connection (never sent; logs and metrics only)",
    503: "Model not ready, limits store down (fail-closed), server draining, or too many open connections",
    504: "The request did not finish within server.request_timeout_s",
}


# The statuses each kind of route can answer besides its success (OpenAPI, README error table).
AUTH_ERRORS = (401,)
RERANK_ERRORS = (400, 401, 403, 404, 413, 429, 503, 504)
ADMIN_ERRORS = (401, 403)


def dialect_opt(dialect: ErrorDialect) -> dict[str, Any]:
    return {ERROR_DIALECT: dialect}


def use_dialect(request: Request, dialect: ErrorDialect) -> None:
    """Answer this request's errors in `dialect` from now on (a route whose body says its dialect)."""
    request.state[ERROR_DIALECT] = dialect


def error_responses(*statuses: int, dialect: ErrorDialect | tuple[ErrorDialect, ...] = COHERE) -> dict[int, ResponseSpec]:
    """OpenAPI responses for a route's error statuses, in its dialect's shape and statuses. A route that
    speaks several dialects (/rerank) documents, for each status, the body of every dialect that sends it."""
    dialects = dialect if isinstance(dialect, tuple) else (dialect,)
    bodies: dict[int, list[type]] = {}
    for d in dialects:
        for status in statuses:
            for sent in d.documented.get(status, (status,)):
                if d.body_type not in bodies.setdefault(sent, []):
                    bodies[sent].append(d.body_type)
    return {
        status: ResponseSpec(
            data_container=types[0] if len(types) == 1 else Union[tuple(types)],  # noqa: UP007 - a runtime union of types
            description=STATUS_MEANING[status],
            generate_examples=False,
        )
        for status, types in sorted(bodies.items())
    }


def _dialect(request: Request | None) -> ErrorDialect:
    if request is None:
        return COHERE
    chosen = request.scope.get("state", {}).get(ERROR_DIALECT)
    if chosen is not None:
        return chosen
    handler = request.scope.get("route_handler")
    return (handler.opt.get(ERROR_DIALECT) if handler is not None else None) or COHERE


def error_response(
    request: Request | None, status: int, message: str, headers: dict[str, str] | None = None, exc: Exception | None = None
) -> Response:
    dialect = _dialect(request)
    return Response(
        dialect.build(status, message, exc), status_code=dialect.status(status, exc), headers=headers or None, media_type=MediaType.JSON
    )


def gateway_error_handler(request: Request, exc: GatewayError) -> Response:
    return error_response(request, exc.status_code, exc.message, exc.headers, exc)


def http_exception_handler(request: Request, exc: HTTPException) -> Response:
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
    return error_response(request, exc.status_code, message, exc.headers, exc)


def invalid_utf8_handler(request: Request, exc: UnicodeDecodeError) -> Response:
    # Litestar decodes JSON bodies before our handlers run; invalid UTF-8 surfaces here.
    return error_response(request, 400, f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}", exc=exc)


def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, f"internal error: {type(exc).__name__}", exc=exc)


EXCEPTION_HANDLERS = {
    GatewayError: gateway_error_handler,
    HTTPException: http_exception_handler,
    UnicodeDecodeError: invalid_utf8_handler,
    Exception: internal_error_handler,
}
