"""The model pool: which models exist, their state, and the runner that answers each loaded one.

Loading happens off the event loop, so /health answers while weights load and /ready tells the truth. A
model that cannot load (no GPU for a GPU-only model, no network for a hub id, a budget that cannot hold
its batch) is marked unavailable with the reason; the others still serve.

Every state change happens on the event loop: a load's outcome is applied when its worker thread returns,
and the engine's supervisor thread posts a dead (or restarted) inference stream to the loop, so the loop
reading an entry never sees it half-written. The serving stages ask the pool, not its entries: a runner
for a model (`runner`), why a model cannot answer right now (`unready_cause`), whether it is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Protocol

import msgspec

from core.config import Effective, LocalModelSpec, ModelSpec, Registry, RemoteModelSpec, ServerSettings, effective, gpu_models
from core.errors import ModelUnavailable
from core.rerank import RerankRequest, RerankResult
from engine import Scheduler
from observability.metrics import Metrics
from pool.local_loading import load_local
from pool.local_runner import LocalRunner
from pool.remote_runner import RemoteRunner
from tenancy.caller import Caller

log = logging.getLogger("rerank_gateway")

# How often a model retired by a reload checks whether its last request has finished.
DRAIN_POLL_S = 0.05

State = Literal["ready", "loading", "unavailable", "not_loaded", "off"]


class Runner(Protocol):
    """What answers a loaded model's requests: pool.local_runner.LocalRunner or pool.remote_runner.RemoteRunner."""

    async def rerank(self, req: RerankRequest, *, caller: Caller, timeout_s: float) -> RerankResult: ...

    def describe(self) -> dict[str, Any]: ...

    def busy(self) -> bool: ...

    def queue_depth(self) -> tuple[int, int] | None: ...

    def reconfigure(self, spec: ModelSpec, server: ServerSettings) -> None: ...

    def watch_health(self, on_change: Callable[[str | None], None]) -> None: ...

    async def close(self) -> None: ...


@dataclass
class ModelEntry:
    model_id: str
    spec: ModelSpec
    eff: Effective | None  # None for a remote model: the upstream has the device, precision and batching
    state: State = "not_loaded"
    reason: str | None = None
    runner: Runner | None = None  # once loaded; one for the model's life, cached
    # Requests inside the pool's runner() for this model: a reload that removes the model closes its runner
    # only once this drops to zero.
    active: int = 0
    _loading: asyncio.Task | None = None

    @property
    def scheduler(self) -> Scheduler | None:
        """A loaded local model's engine scheduler (tests and benchmarks look inside it)."""
        return self.runner.scheduler if isinstance(self.runner, LocalRunner) else None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "rerank-gateway",
            "backend": self.spec.backend,
            "aliases": self.spec.aliases,
        }
        if self.runner is not None:
            out |= self.runner.describe()
        elif self.eff is not None:
            # Not loaded yet: what its profile says it will run with.
            out |= {
                "profile": self.eff.profile,
                "device": self.eff.device,
                "dtype": self.eff.dtype,
                "max_length": self.eff.max_length,
                "max_batch_tokens": self.eff.max_batch_tokens,
                "budget_reason": self.eff.budget_reason,
            }
        out["state"] = self.state
        if self.reason:
            out["reason"] = self.reason
        return out


class ModelPool:
    def __init__(self, registry: Registry, gpu_type: str, metrics: Metrics) -> None:
        self.registry = registry
        self.gpu_type = gpu_type
        self.metrics = metrics
        self.entries: dict[str, ModelEntry] = {}
        for model_id, spec in registry.models.items():
            entry = ModelEntry(model_id, spec, effective(spec, gpu_type) if isinstance(spec, LocalModelSpec) else None)
            if spec.load == "off":
                entry.state, entry.reason = "off", "load: off in the registry"
            self.entries[model_id] = entry
        self._startup: asyncio.Task | None = None
        # Models a reload retired, closing once their last request is done (kept across reloads).
        self._retiring: dict[asyncio.Task, ModelEntry] = {}

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin loading eager models in the background (one at a time: peak host memory stays low)."""
        # After a reload, entries carried over from the previous pool may already be loaded.
        eager = [e for e in self.entries.values() if e.spec.load == "eager" and e.state in ("not_loaded", "loading")]
        for e in eager:
            e.state = "loading"

        async def load_all() -> None:
            for i, entry in enumerate(eager, 1):
                log.info("loading model %s (%d/%d) from %s", entry.model_id, i, len(eager), entry.spec.origin)
                await asyncio.shield(self._begin_load(entry))

        self._startup = asyncio.get_running_loop().create_task(load_all())

    async def wait_started(self) -> None:
        if self._startup is not None:
            await self._startup

    @property
    def ready(self) -> bool:
        return all(e.state == "ready" for e in self.entries.values() if e.spec.load == "eager")

    def stop_startup(self) -> None:
        """Stop starting new loads (a reload hands the remaining ones to the next pool)."""
        if self._startup is not None:
            self._startup.cancel()

    async def close(self) -> None:
        """At shutdown: every model, those still draining after a reload included, now."""
        self.stop_startup()
        for task in list(self._retiring):
            task.cancel()
        for entry in [*self.entries.values(), *self._retiring.values()]:
            runner = _switch_off(entry, "the server is shutting down")
            if runner is not None:
                await runner.close()

    # -- what the serving stages ask ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def runner(self, model_id: str) -> AsyncIterator[Runner]:
        """The model's runner, loading it first if it is lazy; counted as in use until the block ends.
        Raises ModelUnavailable."""
        entry = self.entries[model_id]
        entry.active += 1
        try:
            if entry.state in ("not_loaded", "loading"):
                await asyncio.shield(self._begin_load(entry))
            if entry.state != "ready" or entry.runner is None:
                raise ModelUnavailable(f"model {model_id!r} is {entry.state}: {entry.reason or 'not loaded'}")
            yield entry.runner
        finally:
            entry.active -= 1

    def unready_cause(self, model_id: str) -> str | None:
        """Why a model cannot answer right now without waiting ("loading", "unavailable"), or None. A lazy
        model starts loading, so a route can fall back meanwhile instead of holding the request for the load."""
        entry = self.entries[model_id]
        if entry.state == "ready" and entry.runner is not None:
            return None
        if entry.state == "not_loaded":
            self._begin_load(entry)
        return "loading" if entry.state == "loading" else "unavailable"

    def busy(self, model_id: str) -> bool:
        runner = self.entries[model_id].runner
        return runner is not None and runner.busy()

    def queue_depths(self) -> Iterator[tuple[str, int, int]]:
        """(model id, pairs, tokens) waiting, for each loaded model with a queue here."""
        for model_id, entry in self.entries.items():
            depth = entry.runner.queue_depth() if entry.runner is not None else None
            if depth is not None:
                yield model_id, *depth

    def eager_states(self) -> dict[str, State]:
        return {e.model_id: e.state for e in self.entries.values() if e.spec.load == "eager"}

    def describe(self) -> list[dict[str, Any]]:
        return [entry.describe() for entry in self.entries.values()]

    # -- reload --------------------------------------------------------------------------------------------
    def carry_over(self, old: ModelPool) -> list[ModelEntry]:
        """Take over the previous pool's entries whose model is unchanged, loaded or not; return the old
        entries this pool no longer uses (removed, switched off, or changed in a way that needs a reload).

        Aliases, instructions and planning figures change nothing that is loaded; the eager/lazy switch
        neither. Everything else (source, backend, dtype, limits, profiles) loads the model afresh."""
        retired: list[ModelEntry] = []
        for model_id, previous in old.entries.items():
            entry = self.entries.get(model_id)
            if entry is None or entry.spec.load == "off" or not _same_model(previous, entry):
                retired.append(previous)
                continue
            previous.spec = entry.spec
            if previous.runner is not None:
                previous.runner.reconfigure(entry.spec, self.registry.server)
            self.entries[model_id] = previous
        self._retiring.update(old._retiring)
        return retired

    def retire(self, entries: list[ModelEntry], *, timeout_s: float) -> None:
        """Close models a reload no longer uses once their in-flight requests have finished (at the latest
        timeout_s + 5 s from now); a model still loading is closed once its load is done, never under it."""
        for entry in entries:
            task = asyncio.get_running_loop().create_task(self._retire(entry, timeout_s))
            self._retiring[task] = entry
            task.add_done_callback(self._retiring.pop)

    async def _retire(self, entry: ModelEntry, timeout_s: float) -> None:
        if entry._loading is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(entry._loading)
        deadline = time.monotonic() + timeout_s + 5.0
        while True:
            await asyncio.sleep(DRAIN_POLL_S)
            if entry.active == 0 or time.monotonic() > deadline:
                break
        runner = _switch_off(entry, "removed or replaced by a registry reload")
        if runner is not None:
            await runner.close()
            log.info("model %s unloaded after a reload", entry.model_id)

    # -- loading -------------------------------------------------------------------------------------------
    def _begin_load(self, entry: ModelEntry) -> asyncio.Task:
        """The entry's load, started when it has not been (one per entry, whoever asks first)."""
        if entry._loading is None:
            entry.state = "loading"
            entry._loading = asyncio.get_running_loop().create_task(self._load(entry))
        return entry._loading

    async def _load(self, entry: ModelEntry) -> None:
        loop = asyncio.get_running_loop()
        try:
            runner = await loop.run_in_executor(None, self._open, entry)
        except Exception as exc:  # noqa: BLE001 - any load failure makes this one model unavailable
            entry.state, entry.reason = "unavailable", f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            log.warning("model %s unavailable: %s", entry.model_id, entry.reason)
            return
        entry.runner = runner
        entry.state, entry.reason = "ready", None

        def post(reason: str | None) -> None:
            try:
                loop.call_soon_threadsafe(_stream_health, entry, runner, reason)
            except RuntimeError:
                pass  # the loop is closed: the process is ending

        runner.watch_health(post)

    def _open(self, entry: ModelEntry) -> Runner:
        """In a worker thread: build the model's runner. Touches no entry."""
        spec = entry.spec
        if isinstance(spec, RemoteModelSpec):
            runner = RemoteRunner.open(entry.model_id, spec, self.metrics)
            log.info("model %s ready: %s upstream, %d endpoint(s)", entry.model_id, spec.dialect, len(spec.endpoints))
            return runner
        assert entry.eff is not None
        return load_local(
            entry.model_id, entry.spec, entry.eff, server=self.registry.server, metrics=self.metrics,
            cuda_models=gpu_models(self.registry, self.gpu_type),
        )


def _switch_off(entry: ModelEntry, reason: str) -> Runner | None:
    """Mark an entry off and detach its runner, which the caller closes."""
    entry.state, entry.reason = "off", reason
    runner, entry.runner = entry.runner, None
    return runner


def _stream_health(entry: ModelEntry, runner: Runner, reason: str | None) -> None:
    """On the event loop, from the engine's supervisor: a dead inference stream makes the model unavailable
    (/ready 503, routes fall back) until it is restarted."""
    if entry.runner is not runner or entry.state not in ("ready", "unavailable"):
        return
    entry.state, entry.reason = ("unavailable", reason) if reason else ("ready", None)


def _same_model(old: ModelEntry, new: ModelEntry) -> bool:
    # A model that failed to load gets a fresh attempt: the reload may be the operator's fix.
    if old.state in ("off", "unavailable") or old.eff != new.eff:
        return False
    if type(old.spec) is not type(new.spec):
        return False
    ignore = {k: v for k, v in _CHANGES_NOTHING_LOADED.items() if k in old.spec.__struct_fields__}
    return msgspec.structs.replace(old.spec, **ignore) == msgspec.structs.replace(new.spec, **ignore)


# The keys a reload may change on a loaded model without loading it again (their value when compared).
_CHANGES_NOTHING_LOADED = {"aliases": [], "instruction": None, "load": "eager", "weights_gb": None, "activation_kb_per_token": None}
