"""Typed errors and the one error shape every API dialect answers with (Cohere's {"id", "message"}).

No web framework here: the engine and backends raise these without importing the HTTP layer."""

from __future__ import annotations

import uuid


class GatewayError(Exception):
    """An error with an HTTP status that a client can act on."""

    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(GatewayError):
    status_code = 400


class EmptyInput(BadRequest):
    """A string or list that must not be empty is (`field` is its path in the body, e.g. "texts").
    TEI answers an empty `texts` with an error type and wording of its own."""

    def __init__(self, field: str) -> None:
        super().__init__(f"invalid request: {field} must not be empty")
        self.field = field


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


class ClientClosedRequest(GatewayError):
    """The client went away; nobody reads this answer (nginx's 499), it only labels logs and metrics."""

    status_code = 499


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
