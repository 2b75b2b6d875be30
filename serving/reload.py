"""Live registry reload: SIGHUP in `serve`, POST /admin/reload, and `serve --watch-registry`.

The new file is loaded and validated whole before anything changes; a file with any error is refused and
the running configuration stays. So is a file that changes a key only a restart can apply
(core.config.RESTART_ONLY_KEYS: the HTTP app's body limit and the HTTP server's connection settings): the
refusal names each such key.

Everything else takes effect. A new ModelPool takes over every unchanged model as it is (loaded scheduler,
queue and all), and the pipeline switches, in one assignment, to the new registry served with that pool
and its route table (serving.pipeline.Served); requests already running keep the one they started with.
Models that were removed (or changed, or switched off) are closed only after their in-flight requests have
finished; added or changed models load in the background, and routes fall back while they do.

Tenancy follows too: tenants, keys and their limits are read per request from the registry served; a
changed `limits:` section reconfigures the limiter in place (new window lengths start new windows), or,
for another backend or Redis URL, swaps in a new limiter and closes the old one once the requests it
admitted are done; a changed `usage.path` opens the new ledger before the switch (a path that cannot be
opened refuses the reload) and closes the old one, which keeps its rows, once its last rows are written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from core.config import RESTART_ONLY_KEYS, Registry, RegistryError, load_registry
from core.errors import BadRequest
from pool.model_pool import DRAIN_POLL_S, ModelPool
from serving.pipeline import RerankPipeline, Served
from tenancy.limits import Limiter, build_limiter, lease_ttl_s
from tenancy.usage import UsageStore

log = logging.getLogger("rerank_gateway.reload")

REFUSED = "reload refused, the running configuration is unchanged"


class Reloader:
    def __init__(self, path: str | None, gpu_type: str, pipeline: RerankPipeline) -> None:
        self.path = path
        self.gpu_type = gpu_type
        self.pipeline = pipeline
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()  # reloads asked for by a signal or the file watch
        self._closing: set[asyncio.Task] = set()  # a replaced limiter or ledger, closing once it is done

    async def reload(self) -> dict[str, Any]:
        """Swap in the registry file's current content. BadRequest (nothing changed) when it is invalid or
        changes a key only a restart applies."""
        if self.path is None:
            raise BadRequest("this gateway was not started from a registry file; there is nothing to reload")
        async with self._lock:
            try:
                registry = await asyncio.to_thread(load_registry, self.path)
            except RegistryError as exc:
                raise BadRequest(f"{REFUSED}: {exc}") from None
            old = self.pipeline.served
            changed = changed_keys(old.registry, registry)
            needs_restart = [key for key in changed if key in RESTART_ONLY_KEYS]
            if needs_restart:
                raise BadRequest(
                    f"{REFUSED}: {', '.join(needs_restart)} cannot change without a restart (the HTTP server and "
                    "app were started with them); restart the gateway to apply them, or put back their running values"
                )
            usage = await self._open_usage(registry) if "usage.path" in changed else None
            pool = ModelPool(registry, self.gpu_type, self.pipeline.metrics)
            retired = pool.carry_over(old.pool)
            old.pool.stop_startup()
            self.pipeline.served = Served(registry, pool)  # the switch: every request from here on sees the new registry
            self._apply_limits(old.registry, registry)
            if usage is not None:
                previous, self.pipeline.usage = self.pipeline.usage, usage
                self._start(self._closing, previous.close())
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
                "changed": changed,
            }
            log.info("registry reloaded from %s: %s; changed %s", self.path, outcome["models"], ", ".join(changed) or "nothing else")
            return outcome

    def reload_in_background(self) -> None:
        """For the SIGHUP handler and the file watch: reload, and log the outcome (there is nobody to answer)."""

        async def run() -> None:
            try:
                await self.reload()
            except BadRequest as exc:
                log.error("%s", exc.message)

        self._start(self._background, run())

    async def close(self) -> None:
        """At shutdown: stop reloads in the background, and finish closing what a reload replaced (a ledger's
        last rows are written). The pool closes the models."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)

    # -- tenancy ---------------------------------------------------------------------------------------------
    async def _open_usage(self, registry: Registry) -> UsageStore:
        """The new ledger, open before anything switches: one that cannot open refuses the reload."""
        try:
            return await UsageStore(registry.usage.path).open()
        except Exception as exc:  # noqa: BLE001 - any failure to open is the operator's to fix
            raise BadRequest(f"{REFUSED}: usage.path {registry.usage.path!r} cannot be opened: {type(exc).__name__}: {exc}") from None

    def _apply_limits(self, old: Registry, new: Registry) -> None:
        ttl = lease_ttl_s(new.server)
        if new.limits == old.limits and ttl == lease_ttl_s(old.server):
            return
        limiter = self.pipeline.limiter
        if limiter.takes(new.limits):
            limiter.reconfigure(new.limits, lease_ttl_s=ttl)
            return
        self.pipeline.limiter = build_limiter(new.limits, lease_ttl_s=ttl)
        self._start(self._closing, _retire_limiter(limiter, timeout_s=new.server.request_timeout_s))

    @staticmethod
    def _start(tasks: set[asyncio.Task], work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _retire_limiter(limiter: Limiter, *, timeout_s: float) -> None:
    """Close a replaced limiter once the requests it admitted have released their leases."""
    deadline = time.monotonic() + timeout_s + 5.0
    while limiter.held and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    await limiter.close()


def changed_keys(old: Registry, new: Registry) -> list[str]:
    """The registry keys a reload changes besides models and routes (which its outcome lists apart), as
    dotted paths: each `server.` and `limits.` key, `usage.path`, and whole sections otherwise."""
    out = [f"server.{k}" for k in new.server.__struct_fields__ if getattr(old.server, k) != getattr(new.server, k)]
    out += [f"limits.{k}" for k in new.limits.__struct_fields__ if getattr(old.limits, k) != getattr(new.limits, k)]
    if old.usage.path != new.usage.path:
        out.append("usage.path")
    for section in ("tenants", "admin_api_key_sha256", "gpu_types", "default_model"):
        if getattr(old, section) != getattr(new, section):
            out.append(section)
    return out
