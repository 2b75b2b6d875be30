"""Runs the ASGI app on uvicorn's h11 protocol with the connection hygiene uvicorn lacks, and a bounded drain.

Measured with bench/asgi_server_probe.py (docs/benchmarks/2026-11-24-asgi-servers-xeon.md): plain uvicorn
never closes a connection that sends nothing, trickles its headers or trickles its body, and accepts a
100 KiB header and 500 headers. So each connection here gets, from the registry's `server:` section:
- a header deadline (`header_timeout_s`, from the connection's first byte wait or the next request's first
  byte to the end of its headers) and a body deadline (`body_timeout_s`, from the end of the headers to the
  end of the body): a byte-a-second client is closed when its deadline passes, however often it sends;
- `max_header_bytes` and `max_headers`, checked on the raw bytes before the parser sees them (431);
- `keep_alive_timeout_s` between requests;
- `max_connections`: beyond it a new connection gets an immediate 503 and is closed, so stalled clients
  cannot starve the process of file descriptors.

Shutdown (SIGTERM or SIGINT): /ready answers 503 at once (Lifecycle.draining), the listening socket closes
(new connections are refused), idle connections close, a connection part-way through its headers has
DRAIN_HEADER_GRACE_S to finish them, requests in flight get `drain_timeout_s`. Past that, requests still
waiting on a model are failed with a 503 (Lifecycle.expire), and after RESPONSE_GRACE_S every remaining
connection is closed; the process exits 0, at the latest EXIT_DEADLINE_S after the drain deadline. A
second SIGTERM or SIGINT exits at once, with status 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import h11
import msgspec
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.config import ServerSettings
from core.errors import error_body
from server.lifecycle import Lifecycle

log = logging.getLogger("rerank_gateway")

# A client part-way through its request headers when the drain starts has this long to finish them.
DRAIN_HEADER_GRACE_S = 1.0
# After the drain deadline, how long requests failed with 503 get to write their answer.
RESPONSE_GRACE_S = 1.0
# The app's own shutdown (models, usage ledger) after the connections are gone.
LIFESPAN_SHUTDOWN_S = 5.0
# Past drain_timeout_s + this, the process exits 0 whatever is still running: an inference thread in the
# middle of a long batch (joined by the app's shutdown) must not hold the exit past the promised bound.
EXIT_DEADLINE_S = 1.9
# File descriptors the process needs besides its client connections (models, logs, sqlite, redis).
SPARE_FDS = 256


def _raw_response(status: int, reason: str, message: str, extra_headers: bytes = b"") -> bytes:
    """An answer written before (or instead of) the app: the same error body as every route's default."""
    body = msgspec.json.encode(error_body(message))
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n"
        % (status, reason.encode(), len(body), extra_headers)
        + body
    )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header/body deadlines, header limits, a connection cap and a drain."""

    settings: ServerSettings = ServerSettings()
    lifecycle: Lifecycle = Lifecycle()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused = False
        self.head_bytes = 0
        self.head_lines = 0
        self.tail = b""  # the last bytes of the head so far, to find a CRLFCRLF split across reads
        self.deadline: asyncio.TimerHandle | None = None
        self.deadline_for = ""

    @property
    def between_requests(self) -> bool:
        """h11 waits for the next request head (their_state is IDLE only after a finished cycle)."""
        return self.conn.their_state is h11.IDLE

    # -- connection ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.settings.max_connections:
            self.refused = True
            transport.write(_raw_response(503, "Service Unavailable", "too many open connections; retry later", b"retry-after: 1\r\n"))
            transport.close()
            return
        super().connection_made(transport)
        self._arm(self.settings.header_timeout_s, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused or self.transport.is_closing():
            return
        was_idle = self.between_requests
        if was_idle and not self._head_within_limits(data):
            return
        super().data_received(data)
        self._after_events(was_idle)

    def on_response_complete(self) -> None:
        # Between requests uvicorn's keep-alive timer runs; the header deadline starts with the next byte.
        if self.deadline_for == "headers":
            self._disarm()
        before = self.cycle
        super().on_response_complete()
        # A pipelined request already buffered may have been parsed just now.
        self._after_events(was_idle=self.cycle is not before)

    def _after_events(self, was_idle: bool) -> None:
        state = self.conn.their_state
        if was_idle and state is not h11.IDLE and self.cycle is not None:
            # A request head is complete.
            self.head_bytes = self.head_lines = 0
            self.tail = b""
            self._disarm()
            if self.lifecycle.draining:
                self.cycle.keep_alive = False
            if state is h11.SEND_BODY:
                self._arm(self.settings.body_timeout_s, "body")
        elif self.deadline_for == "body" and state is not h11.SEND_BODY:
            self._disarm()  # the body is in; the app's own request_timeout_s bounds the rest

    # -- limits ---------------------------------------------------------------------------------------
    def _head_within_limits(self, data: bytes) -> bool:
        """Count head bytes and lines before the parser buffers them; 431 past either limit."""
        if self.head_bytes == 0 and self.deadline is None:
            self._arm(self.settings.header_timeout_s, "headers")
        joined = self.tail + data
        end = joined.find(b"\r\n\r\n")
        head = data if end < 0 else joined[len(self.tail) : end + 4]
        self.head_bytes += len(head)
        self.head_lines += head.count(b"\n")
        self.tail = joined[-3:]
        if self.head_bytes > self.settings.max_header_bytes:
            self._refuse_head(f"request headers are larger than {self.settings.max_header_bytes} bytes")
            return False
        # Lines: the request line, each header, the blank line.
        if self.head_lines > self.settings.max_headers + 2:
            self._refuse_head(f"more than {self.settings.max_headers} request headers")
            return False
        return True

    def send_400_response(self, msg: str) -> None:
        # The parser refused the request (malformed head, bad chunking): say so in the error shape.
        self._disarm()
        self.transport.write(_raw_response(400, "Bad Request", f"invalid HTTP request: {msg}"))
        self.transport.close()

    def _refuse_head(self, message: str) -> None:
        self._disarm()
        self.transport.write(_raw_response(431, "Request Header Fields Too Large", message))
        self.transport.close()

    # -- deadlines ------------------------------------------------------------------------------------
    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, self._expired, what)
        self.deadline_for = what

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = None
        self.deadline_for = ""

    def _expired(self, what: str) -> None:
        self.deadline = None
        self.deadline_for = ""
        if self.transport.is_closing():
            return
        in_flight = self.cycle is not None and not self.between_requests and not self.cycle.response_complete
        if (what == "headers" and self.head_bytes) or (what == "body" and in_flight and not self.cycle.response_started):
            # Someone is sending a request too slowly: say so before closing (nothing else was written).
            self.transport.write(_raw_response(408, "Request Timeout", f"request {what} not received in time"))
        if in_flight:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    # -- drain ----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """The drain started: close if idle, finish the request in flight, give a half-sent head a moment."""
        if self.refused or self.transport is None or self.transport.is_closing():
            return
        if self.between_requests and self.head_bytes == 0:
            self._disarm()
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()
        elif self.between_requests:
            if self.deadline is None or self.deadline.when() - self.loop.time() > DRAIN_HEADER_GRACE_S:
                self._arm(DRAIN_HEADER_GRACE_S, "headers")
        elif self.cycle is not None:
            self.cycle.keep_alive = False

    def abort(self) -> None:
        if not self.refused and self.transport is not None:
            self._disarm()
            self.transport.abort()


def protocol_class(settings: ServerSettings, lifecycle: Lifecycle) -> type[GuardedH11Protocol]:
    return type("GatewayH11Protocol", (GuardedH11Protocol,), {"settings": settings, "lifecycle": lifecycle})


class GatewayServer(uvicorn.Server):
    """uvicorn's server loop with our signal handling and a drain bounded by `drain_timeout_s`."""

    def __init__(self, config: uvicorn.Config, settings: ServerSettings, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.settings = settings
        self.lifecycle = lifecycle

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, _frame: Any) -> None:
        if self.should_exit:
            # A second signal: the operator does not want to wait for the drain.
            os.write(2, f"second {signal.Signals(sig).name}: exiting now, without draining\n".encode())
            os._exit(1)
        self.lifecycle.start_draining()  # /ready is 503 from this instant
        self.should_exit = True

    async def shutdown(self, sockets: list | None = None) -> None:
        state = self.server_state
        loop = asyncio.get_running_loop()
        # A thread, so it fires even while the event loop is blocked (e.g. joining an inference thread).
        watchdog = threading.Timer(self.settings.drain_timeout_s + EXIT_DEADLINE_S, _exit_now)
        watchdog.daemon = True
        watchdog.start()
        for server in self.servers:
            server.close()  # new connections are refused from here
        for connection in list(state.connections):
            connection.shutdown()
        deadline = loop.time() + self.settings.drain_timeout_s
        log.info("draining %d connection(s), at most %g s", len(state.connections), self.settings.drain_timeout_s)
        while (state.connections or state.tasks) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if state.connections or state.tasks:
            log.warning(
                "drain timeout: failing %d request(s) still in flight with 503, closing %d connection(s)",
                len(state.tasks), len(state.connections),
            )
            self.lifecycle.expire()
            grace = loop.time() + RESPONSE_GRACE_S
            while state.tasks and loop.time() < grace:
                await asyncio.sleep(0.05)
            for connection in list(state.connections):
                connection.abort()
            for task in list(state.tasks):
                task.cancel()
        try:
            await asyncio.wait_for(self.lifespan.shutdown(), LIFESPAN_SHUTDOWN_S)
        except asyncio.TimeoutError:
            log.warning("application shutdown did not finish in %g s", LIFESPAN_SHUTDOWN_S)


def _exit_now() -> None:
    os.write(2, b"drain: shutdown overran drain_timeout_s; exiting now\n")
    os._exit(0)


def raise_fd_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: make room for the cap, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open-file limit %d is below server.max_connections + %d; raise `ulimit -n`", new, SPARE_FDS)


def config(
    app: Any, *, host: str, port: int, settings: ServerSettings, lifecycle: Lifecycle, log_level: str = "info", **log_options: Any
) -> uvicorn.Config:
    """`log_options` (observability.logs.configure's) route uvicorn's own lines through the gateway's log format."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(settings, lifecycle),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        # The parser's own bound on a head; ours (max_header_bytes) answers 431 before it is reached.
        h11_max_incomplete_event_size=settings.max_header_bytes + 4096,
        backlog=min(2048, settings.max_connections),
        lifespan="on",
        log_level=log_level,
        server_header=False,
        **log_options,
    )


def serve(
    app: Any,
    *,
    host: str,
    port: int,
    settings: ServerSettings,
    lifecycle: Lifecycle | None = None,
    log_level: str = "info",
    **log_options: Any,
) -> None:
    """Serve until SIGTERM/SIGINT, drain, return (the caller exits 0)."""
    lifecycle = lifecycle or Lifecycle()
    raise_fd_limit(settings.max_connections)
    server = GatewayServer(config(app, host=host, port=port, settings=settings, lifecycle=lifecycle, log_level=log_level, **log_options), settings, lifecycle)
    server.run()
