"""Inference threads ("streams") and the supervisor that keeps them alive.

Streams run the forward passes (torch releases the GIL): one on a GPU; on a CPU several, each running
whole batches on its share of the cores. Small encoder GEMMs scale poorly across OpenMP threads, and one
preempted thread stalls every barrier of an op, so on a CPU that other processes share, two
single-threaded streams beat one two-threaded stream by far (bench/, the README benchmark).

The failure boundary: everything a stream does with a batch runs inside `run_guarded`; an error fails
that batch's requests and the stream goes on. A stream that dies anyway (an error while taking a batch,
or one the boundary could not contain) fails the batch it held; the supervisor reports the model
unavailable with the reason (`on_health(reason)`, so /ready answers 503), restarts the stream after a
back-off, and reports it healthy again once every stream is running.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import torch

from engine.device import StreamContext

log = logging.getLogger("rerank_gateway.engine")

# A dead stream is restarted after this long, doubling (up to the maximum) while streams keep dying
# within RESTART_RESET_S of the last restart.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
RESTART_RESET_S = 60.0


class InferenceStreams:
    """`take()` blocks for the next job (None: stop); `run(job)` runs it inside the failure boundary,
    `fail(job, message)` fails its requests. A job is whatever `take` returns (a batch, a control call)."""

    def __init__(
        self,
        name: str,
        count: int,
        context: StreamContext,
        *,
        take: Callable[[], Any],
        run: Callable[[Any], None],
        fail: Callable[[Any, str], None],
        on_health: Callable[[str | None], None],
        taken: Callable[[Any], None] = lambda job: None,
    ) -> None:
        self.name = name
        self.context = context
        self._take, self._run, self._fail, self._taken = take, run, fail, taken
        self.on_health = on_health
        self.restarts = 0
        self.last_death: str | None = None
        self._cv = threading.Condition()
        self._stopping = False
        self._holding: dict[int, Any] = {}  # stream index -> the job it holds
        self._dead: list[tuple[int, str]] = []
        self._threads = [self._start(k) for k in range(count)]
        self._supervisor = threading.Thread(target=self._supervise, name=f"supervise-{name}", daemon=True)
        self._supervisor.start()

    @property
    def count(self) -> int:
        return len(self._threads)

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def _start(self, k: int) -> threading.Thread:
        thread = threading.Thread(target=self._loop, args=(k,), name=f"infer-{self.name}-{k}", daemon=True)
        thread.start()
        return thread

    # -- one stream -----------------------------------------------------------------------------------------
    def _loop(self, k: int) -> None:
        reason = "exited"
        try:
            torch.set_grad_enabled(False)
            with self.context.enter():
                while True:
                    job = self._take()  # outside the boundary: a failure here kills the stream
                    if job is None:
                        return
                    self._holding[k] = job
                    self._taken(job)
                    self.run_guarded(job)
                    self._holding.pop(k, None)
        except BaseException as exc:  # noqa: BLE001 - reported to the supervisor, which restarts the stream
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.exception("inference stream %d of model %s died", k, self.name)
        finally:
            with self._cv:
                if not self._stopping:
                    self._dead.append((k, reason))
                    self._cv.notify_all()

    def run_guarded(self, job: Any) -> None:
        try:
            self._run(job)
        except Exception as exc:  # noqa: BLE001 - a broken batch fails its requests, never the stream
            log.exception("batch failed on model %s", self.name)
            self._fail(job, f"inference failed on model {self.name!r}: {type(exc).__name__}: {exc}".splitlines()[0][:500])

    # -- the supervisor -------------------------------------------------------------------------------------
    def _supervise(self) -> None:
        backoff = RESTART_BACKOFF_S
        last_restart = 0.0
        while True:
            with self._cv:
                while not self._dead and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                k, reason = self._dead.pop(0)
            self.last_death = reason
            # Unavailable first, then the held batch fails: a client told of the failure finds the model
            # reported unavailable, not ready.
            self.on_health(f"inference stream {k} died ({reason}); restarting")
            held = self._holding.pop(k, None)
            if held is not None:
                self._fail(held, f"the inference stream of model {self.name!r} died ({reason}); it is being restarted")
            if time.monotonic() - last_restart > RESTART_RESET_S:
                backoff = RESTART_BACKOFF_S
            with self._cv:
                self._cv.wait_for(lambda: self._stopping, timeout=backoff)
                if self._stopping:
                    return
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            last_restart = time.monotonic()
            self.restarts += 1
            self._threads[k] = self._start(k)
            log.warning("inference stream %d of model %s restarted (restart %d)", k, self.name, self.restarts)
            with self._cv:
                if not self._dead:
                    self.on_health(None)

    def stop(self, wake: Callable[[], None]) -> None:
        """Stop the supervisor and the streams; `wake` makes a blocked take() return None."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        wake()
        for thread in self._threads:
            thread.join(timeout=10)
        self._supervisor.join(timeout=5)
