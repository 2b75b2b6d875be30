"""Live registry reload: SIGHUP in `serve`, and POST /admin/reload.

The new file is loaded and validated whole before anything changes; a file with any error is refused and
the running configuration stays. Then a new ModelPool takes over every unchanged model as it is (loaded
scheduler, queue and all), a new RerankService with the new route table is built around it, and a single
assignment of app.state.service switches new requests over. Requests already running keep the service
they started with. Models that were removed (or changed, or switched off) are closed only after their
in-flight requests have finished; added or changed models load in the background, and routes fall back
while they do.

What a reload cannot change: the request body limit (fixed when the HTTP app is built).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from litestar.datastructures import State

from core.config import RegistryError, load_registry
from core.errors import BadRequest
from engine import Scheduler
from pool.model_pool import ModelEntry, ModelPool
from serving.service import RerankService

log = logging.getLogger("rerank_gateway.reload")

# How often a retiring model checks whether its last request has finished.
DRAIN_POLL_S = 0.05


class Reloader:
    def __init__(self, path: str | None, gpu_type: str) -> None:
        self.path = path
        self.gpu_type = gpu_type
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task, ModelEntry] = {}
        self._background: set[asyncio.Task] = set()

    async def reload(self, state: State) -> dict[str, Any]:
        """Swap in the registry file's current content. BadRequest (nothing changed) when it is invalid."""
        if self.path is None:
            raise BadRequest("this gateway was not started from a registry file; there is nothing to reload")
        async with self._lock:
            try:
                registry = await asyncio.to_thread(load_registry, self.path)
            except RegistryError as exc:
                raise BadRequest(f"reload refused, the running configuration is unchanged: {exc}") from None
            old: RerankService = state.service
            pool = ModelPool(registry, self.gpu_type, old.metrics)
            retired = pool.carry_over(old.pool)
            service = RerankService(registry, pool, old.metrics)
            old.pool.stop_startup()
            state.service = service  # the switch: every request from here on sees the new registry
            pool.start()
            for entry in retired:
                task = asyncio.get_running_loop().create_task(self._retire(entry, registry.server.request_timeout_s))
                self._retiring[task] = entry
                task.add_done_callback(self._retiring.pop)
            kept = [m for m in pool.entries if pool.entries[m] is old.pool.entries.get(m)]
            outcome = {
                "status": "reloaded",
                "registry": str(self.path),
                "models": {
                    "added": sorted(set(pool.entries) - set(old.pool.entries)),
                    "removed": sorted(set(old.pool.entries) - set(pool.entries)),
                    "reloaded": sorted(e.model_id for e in retired if e.model_id in pool.entries),
                    "kept": sorted(kept),
                },
                "routes": sorted(registry.routes),
            }
            log.info("registry reloaded from %s: %s", self.path, outcome["models"])
            return outcome

    def reload_in_background(self, state: State) -> None:
        """For the SIGHUP handler: reload, and log the outcome (there is nobody to answer)."""

        async def run() -> None:
            try:
                await self.reload(state)
            except BadRequest as exc:
                log.error("%s", exc.message)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _retire(self, entry: ModelEntry, timeout_s: float) -> None:
        if entry._loading is not None:
            # A model still loading is closed once its load finishes (or fails), never under the loader.
            with contextlib.suppress(Exception):
                await asyncio.shield(entry._loading)
        deadline = time.monotonic() + timeout_s + 5.0
        while True:
            await asyncio.sleep(DRAIN_POLL_S)
            if entry.active == 0 or time.monotonic() > deadline:
                break
        scheduler = _switch_off(entry)
        if scheduler is not None:
            await asyncio.to_thread(scheduler.close)
            log.info("model %s unloaded after a reload", entry.model_id)

    def close(self) -> None:
        """At shutdown: close what is still draining, now."""
        for task, entry in list(self._retiring.items()):
            task.cancel()
            scheduler = _switch_off(entry)
            if scheduler is not None:
                scheduler.close()
        for task in list(self._background):
            task.cancel()


def _switch_off(entry: ModelEntry) -> Scheduler | None:
    """Mark a retired entry off and detach its scheduler, which the caller closes."""
    entry.state, entry.reason = "off", "removed or replaced by a registry reload"
    scheduler, entry.scheduler = entry.scheduler, None
    if entry.remote is not None:  # a remote model only holds connections
        entry.remote.close()
        entry.remote = None
    return scheduler
