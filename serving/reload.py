"""Live registry reload: SIGHUP in `serve`, and POST /admin/reload.

The new file is loaded and validated whole before anything changes; a file with any error is refused and
the running configuration stays. Then a new ModelPool takes over every unchanged model as it is (loaded
scheduler, queue and all), and the pipeline switches, in one assignment, to the new registry served with
that pool and its route table (serving.pipeline.Served). Requests already running keep the one they
started with. Models that were removed (or changed, or switched off) are closed only after their
in-flight requests have finished; added or changed models load in the background, and routes fall back
while they do.

What a reload cannot change: the request body limit (fixed when the HTTP app is built).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from core.config import RegistryError, load_registry
from core.errors import BadRequest
from pool.model_pool import ModelPool
from serving.pipeline import RerankPipeline, Served

log = logging.getLogger("rerank_gateway.reload")


class Reloader:
    def __init__(self, path: str | None, gpu_type: str, pipeline: RerankPipeline) -> None:
        self.path = path
        self.gpu_type = gpu_type
        self.pipeline = pipeline
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()

    async def reload(self) -> dict[str, Any]:
        """Swap in the registry file's current content. BadRequest (nothing changed) when it is invalid."""
        if self.path is None:
            raise BadRequest("this gateway was not started from a registry file; there is nothing to reload")
        async with self._lock:
            try:
                registry = await asyncio.to_thread(load_registry, self.path)
            except RegistryError as exc:
                raise BadRequest(f"reload refused, the running configuration is unchanged: {exc}") from None
            old = self.pipeline.served
            pool = ModelPool(registry, self.gpu_type, self.pipeline.metrics)
            retired = pool.carry_over(old.pool)
            old.pool.stop_startup()
            self.pipeline.served = Served(registry, pool)  # the switch: every request from here on sees the new registry
            pool.start()
            pool.retire(retired, timeout_s=registry.server.request_timeout_s)
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

    def reload_in_background(self) -> None:
        """For the SIGHUP handler and the file watch: reload, and log the outcome (there is nobody to answer)."""

        async def run() -> None:
            try:
                await self.reload()
            except BadRequest as exc:
                log.error("%s", exc.message)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close(self) -> None:
        """At shutdown: stop reloads in the background (the pool closes the models)."""
        for task in list(self._background):
            task.cancel()
