"""Structured logs and the request id.

Every HTTP request gets an id: the caller's `X-Request-Id` when it is a sane token (a front door passes
its own to the workers it calls), a fresh one otherwise. It is returned as a response header, set in a
context variable for the request's task (so every log line written while serving it carries it), and
`outbound_headers()` gives it to code that calls another service on the request's behalf.

`serve --log-format json` writes one JSON object per line on stderr (what log collectors on Kubernetes
expect); `text` keeps the human format. Each request ends with one access line: method, path, status,
duration, tenant, model, request id.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal

from litestar import Litestar
from litestar.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-Id"
_HEADER = REQUEST_ID_HEADER.lower().encode()
# An id from outside is echoed into logs and headers: only a short token, never spaces or newlines.
_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
access_log = logging.getLogger("rerank_gateway.access")

LogFormat = Literal["text", "json"]


def current_request_id() -> str | None:
    return _request_id.get()


def outbound_headers() -> dict[str, str]:
    """Headers for a call made on behalf of the current request (a front door calling a worker)."""
    rid = _request_id.get()
    return {REQUEST_ID_HEADER: rid} if rid else {}


def _incoming_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name.lower() == _HEADER and _SANE_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


def with_request_id(app: Litestar) -> Litestar:
    """Wrap the app's whole ASGI handler, outside its exception handling and routing, so 401s, 404s and
    every other error response carry the id and get their access line too (a Litestar middleware sits
    inside the exception handler and never sees them)."""
    app.asgi_handler = request_id_middleware(app.asgi_handler)
    return app


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """The id in, the header out, one access line at the end."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        rid = _incoming_id(scope)
        token = _request_id.set(rid)
        started = time.perf_counter()
        status, model = 0, None

        async def send_with_id(message: Message) -> None:
            nonlocal status, model
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER]
                model = next((v.decode("latin-1") for k, v in headers if k.lower() == b"x-rerank-model"), None)
                message = {**message, "headers": [*headers, (_HEADER, rid.encode("ascii"))]}  # type: ignore[typeddict-item]
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            user = scope.get("user")
            fields = {
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                "tenant": getattr(user, "tenant", None),
                "model": model,
            }
            access_log.info("%s %s %s", fields["method"], fields["path"], status, extra={"fields": fields})
            _request_id.reset(token)

    return middleware


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        record.request_id_text = record.request_id or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(fmt: LogFormat, level: int = logging.INFO) -> dict[str, Any]:
    """Set up the root logger for `serve`; returns the uvicorn.run options that route its logs here."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id_text)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Litestar's and uvicorn's loggers write through the root handler (call this after the app is built:
    # Litestar sets up its own logging then). uvicorn's access line is replaced by ours, which has the
    # request id, tenant and model.
    for name in ("litestar", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.disabled = False
    if fmt == "json":
        _quiet_transformers()
    return {"log_config": None, "access_log": False}


def _quiet_transformers() -> None:
    """transformers writes progress bars and its own handler's lines to stderr: not JSON. Route its logs
    to the root handler and turn the bars off."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
