"""The model pool: which models exist, their state, and the scheduler of each loaded one.

Loading happens off the event loop, so /health answers while weights load and /ready tells the truth. A
model that cannot load (no GPU for a GPU-only model, no network for a hub id, a budget that cannot hold
its batch) is marked unavailable with the reason; the others still serve.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from typing import Literal

import msgspec

from backends import backend_class
from core.budgets import gpu_budget, usable_gb
from core.config import Effective, ModelSpec, Registry, effective
from core.errors import ModelUnavailable
from engine import Scheduler
from observability.metrics import Metrics
from pool.remote_runner import RemoteModel
from pool.local_runner import LocalRunner, Runner

log = logging.getLogger("rerank_gateway")

State = Literal["ready", "loading", "unavailable", "not_loaded", "off"]
GB = 1024**3


class BudgetError(RuntimeError):
    pass


@dataclass
class ModelEntry:
    model_id: str
    spec: ModelSpec
    eff: Effective
    state: State = "not_loaded"
    reason: str | None = None
    scheduler: Scheduler | None = None
    remote: RemoteModel | None = None  # backend: remote, in place of a scheduler
    weights_bytes: int = 0
    warmup: dict | None = None
    load_seconds: float = 0.0
    # The token budget the scheduler runs with and why, once loaded (a GPU budget chosen by the warm-up
    # differs from the effective probe size).
    batch_tokens: int | None = None
    budget_reason: str | None = None
    # Requests inside RerankService.rerank for this model: a reload that removes the model closes its
    # scheduler only once this drops to zero.
    active: int = 0
    _loading: asyncio.Future | None = None

    def describe(self) -> dict:
        out = {
            "id": self.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "rerank-gateway",
            "backend": self.spec.backend,
            "aliases": self.spec.aliases,
        }
        if self.spec.backend != "remote":
            # A remote model has no device, precision or batching here: the upstream has them.
            out |= {
                "profile": self.eff.profile,
                "device": self.eff.device,
                "dtype": str(self.scheduler.backend.dtype).removeprefix("torch.") if self.scheduler else self.eff.dtype,
                "max_length": self.eff.max_length,
                "max_batch_tokens": self.batch_tokens or self.eff.max_batch_tokens,
                "budget_reason": self.budget_reason or self.eff.budget_reason,
            }
            runtime = self.scheduler.backend.runtime if self.scheduler else None
            if runtime is not None:
                out["runtime"] = runtime.describe()
        out["state"] = self.state
        if self.reason:
            out["reason"] = self.reason
        if self.remote is not None:
            out["upstream"] = self.remote.describe()
        return out


class ModelPool:
    def __init__(self, registry: Registry, gpu_type: str, metrics: Metrics) -> None:
        self.registry = registry
        self.gpu_type = gpu_type
        self.metrics = metrics
        self.entries: dict[str, ModelEntry] = {}
        for model_id, spec in registry.models.items():
            entry = ModelEntry(model_id, spec, effective(spec, gpu_type))
            if spec.load == "off":
                entry.state, entry.reason = "off", "load: off in the registry"
            self.entries[model_id] = entry
        self._startup: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin loading eager models in the background (one at a time: peak host memory stays low)."""
        # After a reload, entries carried over from the previous pool may already be loaded.
        eager = [e for e in self.entries.values() if e.spec.load == "eager" and e.state in ("not_loaded", "loading")]
        for e in eager:
            e.state = "loading"

        async def load_all() -> None:
            for i, entry in enumerate(eager, 1):
                log.info("loading model %s (%d/%d) from %s", entry.model_id, i, len(eager), entry.spec.source)
                await self.ensure_loaded(entry)

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

    def close(self) -> None:
        self.stop_startup()
        for entry in self.entries.values():
            if entry.scheduler is not None:
                entry.scheduler.close()
                entry.scheduler = None
            if entry.remote is not None:
                entry.remote.close()

    # -- access -----------------------------------------------------------------------------------------
    async def scheduler(self, model_id: str) -> Scheduler:
        """The scheduler of a local model, loading it first if it is lazy. Raises ModelUnavailable."""
        entry = await self._ready(model_id)
        if entry.scheduler is None:
            raise ModelUnavailable(f"model {model_id!r} has no local scheduler (backend {entry.spec.backend})")
        return entry.scheduler

    async def runner(self, model_id: str) -> Runner:
        """What answers a model's requests (pool.local_runner), loading it first if it is lazy."""
        entry = await self._ready(model_id)
        if entry.remote is not None:
            return entry.remote
        assert entry.scheduler is not None
        return LocalRunner(
            model_id, entry.spec, entry.eff, entry.scheduler, self.metrics,
            max_chunks_per_request=self.registry.server.max_chunks_per_request,
        )

    async def _ready(self, model_id: str) -> ModelEntry:
        entry = self.entries[model_id]
        if entry.state == "not_loaded":
            entry.state = "loading"
        if entry.state == "loading":
            await self.ensure_loaded(entry)
        if entry.state != "ready" or (entry.scheduler is None and entry.remote is None):
            raise ModelUnavailable(f"model {model_id!r} is {entry.state}: {entry.reason or 'not loaded'}")
        return entry

    def start_loading(self, model_id: str) -> None:
        """Begin loading a lazy model without waiting for it (a route falls back meanwhile)."""
        entry = self.entries[model_id]
        if entry.state == "not_loaded" and entry._loading is None:
            entry.state = "loading"
            entry._loading = asyncio.get_running_loop().run_in_executor(None, self._load, entry)

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
            if previous.scheduler is not None:
                previous.scheduler.max_queue_pairs = self.registry.server.max_queue_pairs
                previous.scheduler.max_queue_tokens = self.registry.server.max_queue_tokens
            self.entries[model_id] = previous
        return retired

    async def ensure_loaded(self, entry: ModelEntry) -> None:
        if entry._loading is None:
            entry._loading = asyncio.get_running_loop().run_in_executor(None, self._load, entry)
        await asyncio.shield(entry._loading)

    def _load(self, entry: ModelEntry) -> None:
        start = time.perf_counter()
        entry.state = "loading"
        try:
            if entry.spec.backend == "remote":
                entry.remote = RemoteModel.open(entry.model_id, entry.spec, self.metrics)
                entry.state, entry.reason = "ready", None
                log.info("model %s ready: %s upstream, %d endpoint(s)", entry.model_id, entry.spec.dialect, len(entry.spec.endpoints))
                return
            backend = backend_class(entry.spec.backend)(entry.model_id, entry.spec, entry.eff)
            if backend.device.type == "cuda":
                import torch

                if not torch.cuda.is_available():
                    raise RuntimeError("the profile needs a CUDA GPU and none is available")
            backend.load()
            entry.weights_bytes = backend.weights_bytes()
            scheduler = self._scheduler(entry, backend, entry.eff.max_batch_tokens)
            try:
                entry.warmup = scheduler.warmup(entry.eff.max_length)
                if entry.eff.auto_budget:
                    scheduler = self._size_budget(entry, backend, scheduler)
                entry.batch_tokens = scheduler.max_batch_tokens
                self._check_budget(entry)
            except BaseException:
                scheduler.close()
                raise
            scheduler.on_health = lambda reason: _stream_health(entry, scheduler, reason)
            entry.scheduler = scheduler
            entry.state, entry.reason = "ready", None
            # What is loaded now lives as long as the process: leave it out of every later full garbage
            # collection, which otherwise walks these objects again and stalls all threads for 100s of ms.
            gc.collect()
            gc.freeze()
            entry.load_seconds = time.perf_counter() - start
            log.info(
                "model %s ready in %.1f s (%s, %s, %.2f GB weights)",
                entry.model_id, entry.load_seconds, backend.device, backend.dtype, entry.weights_bytes / GB,
            )
        except Exception as exc:  # noqa: BLE001 - any load failure makes this one model unavailable
            entry.state, entry.reason = "unavailable", f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            log.warning("model %s unavailable: %s", entry.model_id, entry.reason)

    def _scheduler(self, entry: ModelEntry, backend, max_batch_tokens: int) -> Scheduler:
        return Scheduler(
            backend,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=entry.eff.max_batch_size,
            max_queue_pairs=self.registry.server.max_queue_pairs,
            max_queue_tokens=self.registry.server.max_queue_tokens,
            metrics=self.metrics,
            cpu_streams=entry.spec.cpu_streams,
        )

    def _size_budget(self, entry: ModelEntry, backend, probe: Scheduler) -> Scheduler:
        """A GPU model with no profile: size its budget from the probe warm-up, then prove it with a
        warm-up at the chosen size (a scheduler of its own; the probe's is closed)."""
        # The inference thread's cuBLAS workspace (engine.warmup) is a fixed cost beside the weights, not
        # bytes per token: left out of the per-token rate.
        workspace = int(entry.warmup.get("workspace_bytes", 0))
        tokens, why = gpu_budget(
            weights_bytes=entry.weights_bytes + workspace, activation_bytes=int(entry.warmup["activation_bytes"]) - workspace,
            probe_tokens=probe.max_batch_tokens, budget_bytes=self._budget_bytes(entry), max_length=entry.eff.max_length,
        )
        probe.close()
        scheduler = self._scheduler(entry, backend, tokens)
        try:
            entry.warmup = scheduler.warmup(entry.eff.max_length)
        except BaseException:
            scheduler.close()
            raise
        entry.budget_reason = why
        return scheduler

    def _budget_bytes(self, entry: ModelEntry) -> float:
        """The model's memory_budget_gb, else an even share of the card's usable memory among the models
        this registry may load on it."""
        if entry.eff.memory_budget_gb is not None:
            return entry.eff.memory_budget_gb * GB
        import torch

        card_gb = torch.cuda.get_device_properties(0).total_memory / GB
        sharing = sum(1 for e in self.entries.values() if e.eff.device == "cuda" and e.spec.load != "off")
        return usable_gb(card_gb) / max(1, sharing) * GB

    def _check_budget(self, entry: ModelEntry) -> None:
        budget = entry.eff.memory_budget_gb
        if budget is None or entry.eff.device != "cuda" or entry.warmup is None:
            return
        need = entry.weights_bytes + entry.warmup["activation_bytes"]
        if need > budget * GB:
            raise BudgetError(
                f"model {entry.model_id}: weights {entry.weights_bytes / GB:.2f} GB + one batch of "
                f"{entry.batch_tokens or entry.eff.max_batch_tokens} tokens ({entry.warmup['pairs']} pairs x {entry.warmup['length']}, "
                f"mixed lengths; the inference thread's workspace included) {entry.warmup['activation_bytes'] / GB:.2f} GB = "
                f"{need / GB:.2f} GB exceeds its memory_budget_gb {budget:g} (profile {entry.eff.profile}); "
                f"lower max_batch_tokens or raise the budget"
            )


def _stream_health(entry: ModelEntry, scheduler: Scheduler, reason: str | None) -> None:
    """From the engine's supervisor: a dead inference stream makes the model unavailable (/ready 503,
    routes fall back) until it is restarted."""
    if entry.scheduler is not scheduler or entry.state not in ("ready", "unavailable"):
        return
    entry.state, entry.reason = ("unavailable", reason) if reason else ("ready", None)


def _same_model(old: ModelEntry, new: ModelEntry) -> bool:
    # A model that failed to load gets a fresh attempt: the reload may be the operator's fix.
    if old.state in ("off", "unavailable") or old.eff != new.eff:
        return False
    ignore = {"aliases": [], "instruction": None, "load": "eager", "weights_gb": None, "activation_kb_per_token": None}
    return msgspec.structs.replace(old.spec, **ignore) == msgspec.structs.replace(new.spec, **ignore)
