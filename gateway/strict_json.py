"""Strict JSON request bodies, for every dialect, decoded once: empty bodies and nesting depth are checked on
the raw bytes, then msgspec decodes them strictly into the handler's request struct.

Litestar on its own decodes a body with msgspec in lax mode (`"1"` and `1.0` pass as the integer 1,
`"true"` as a boolean), and a deeply nested body overflows the C stack guard (RecursionError, a 500).
`StrictBody`, the DTO each rerank router sets, refuses all of these with a 400 naming the problem, and its
decode is the only one: the handler's typed `data` is what it decoded."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.typing import FieldDefinition

from core.errors import BadRequest, EmptyInput

# A JSON string: its brackets do not nest. Unrolled so it runs in linear time on 60 MB bodies.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_AS_ARRAYS = bytes.maketrans(b"{}", b"[]")


def too_deep(body: bytes, max_depth: int) -> bool:
    """Whether arrays and objects nest deeper than `max_depth`, in C-speed passes over the bytes: strings
    are dropped, objects count as arrays, then innermost `[]` pairs are removed round by round (a round
    lowers every branch by one level); a run of max_depth+1 openers, or brackets left after max_depth+1
    rounds, is too deep. Malformed bracketing is left to the decoder, which then reports it."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    brackets = _STRING.sub(b"", body).translate(_AS_ARRAYS, _NOT_BRACKETS)
    run = b"[" * (max_depth + 1)
    for _ in range(max_depth + 1):
        if not brackets:
            return False
        if run in brackets:
            return True
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return False
        brackets = shorter
    return True


def check_depth(body: bytes, max_depth: int) -> None:
    if too_deep(body, max_depth):
        raise BadRequest(f"invalid request: JSON nested deeper than {max_depth} levels (server.max_json_depth)")


def check_body(body: bytes, max_depth: int) -> None:
    """What is checked on the raw bytes: not empty, not nested deeper than max_depth."""
    if not body or body.isspace():
        raise BadRequest("invalid request: request body is empty")
    check_depth(body, max_depth)


def decode(body: bytes, type_: Any, *, max_depth: int) -> Any:
    """Decode a request body strictly into `type_`, or raise BadRequest saying what is wrong."""
    check_body(body, max_depth)
    return decode_checked(body, type_)


def decode_checked(body: bytes, type_: Any) -> Any:
    """decode() of a body check_body has passed."""
    try:
        return msgspec.json.decode(body, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = re.search(r" - at `\$\.?(.*)`$", message)
        if match:
            field, problem = match.group(1) or "body", message[: match.start()]
            if "of length >= 1" in problem:
                raise EmptyInput(field) from None
            message = f"{field}: {problem}"
        raise BadRequest(f"invalid request: {message}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid request: body is not valid JSON: {exc}") from None


def max_json_depth(connection: ASGIConnection) -> int:
    """server.max_json_depth of the registry the app serves now."""
    return connection.app.state.pipeline.registry.server.max_json_depth


class StrictBody:
    """The DTO of the rerank routers (Litestar's `dto=`): decodes a handler's `data` once, strictly, into
    the type the handler annotates. Litestar calls a DTO through these methods only; this one keeps none
    of Litestar's field machinery, since the request structs are msgspec's own and decode as they are.
    The OpenAPI document gets the same schema it would without a DTO."""

    _types: ClassVar[dict[str, Any]] = {}

    def __init__(self, asgi_connection: ASGIConnection) -> None:
        self.connection = asgi_connection

    @classmethod
    def create_for_field_definition(cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None) -> None:
        cls._types[handler_id] = field_definition.annotation

    @classmethod
    def create_openapi_schema(cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any) -> Any:
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls._types[handler_id]))

    @classmethod
    def is_supported_model_type_field(cls, field_definition: FieldDefinition) -> bool:
        return False  # answers are encoded by Litestar as usual

    def decode_bytes(self, value: bytes) -> Any:
        return decode(value, self._types[self.connection.route_handler.handler_id], max_depth=max_json_depth(self.connection))

    def decode_builtins(self, value: Any) -> Any:
        raise BadRequest("invalid request: the body must be JSON (content-type: application/json)")


async def refuse_empty_body(request: Request) -> None:
    """before_request of the rerank routers: Litestar hands a DTO no body at all when it is empty."""
    if not await request.body():
        raise BadRequest("invalid request: request body is empty")
