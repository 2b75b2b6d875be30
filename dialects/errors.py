"""How a dialect writes an error: its body (and the OpenAPI schema of it) and the status it answers with.

gateway.http_errors writes every error response, and the OpenAPI document's error responses, from a route's
`ErrorDialect`; each dialect module defines its own (`tei.ERRORS`, `voyage.ERRORS`). Routes without one
answer in Cohere's `{"id", "message"}` (`COHERE`, core.errors.error_body)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import msgspec

from core.errors import error_body


class ErrorBody(msgspec.Struct):
    """Cohere's error body; `id` is unique per error, for support requests."""

    id: str
    message: str


def _same_status(status: int, _exc: Exception | None) -> int:
    return status


@dataclass(frozen=True)
class ErrorDialect:
    """How one API dialect writes an error: the body type (for OpenAPI), how to build it, and the status
    it answers with (the gateway's, unless the dialect has its own, as TEI's per error type)."""

    body_type: type
    build: Callable[[int, str, Exception | None], Any]  # (gateway status, message, the error) -> body
    status: Callable[[int, Exception | None], int] = _same_status  # (gateway status, the error) -> status sent
    # The statuses a gateway status can become in this dialect (for OpenAPI); the same status where absent.
    documented: Mapping[int, tuple[int, ...]] = field(default_factory=dict)


COHERE = ErrorDialect(ErrorBody, lambda _status, message, _exc: error_body(message))
