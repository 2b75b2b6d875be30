"""`serve --watch-registry S`: the served registry follows its file without a restart.

Polls the registry file's content every S seconds and, when it changed, reloads it as SIGHUP and POST
/admin/reload do (serving.reload: an invalid file is refused, the running configuration stays). On
Kubernetes the file is the one `rerank-gateway registry-sync` writes from a ConfigMap and a Secret
(ops.registry_sync).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from litestar import Litestar

log = logging.getLogger("rerank_gateway.registry_watch")


def digest(paths: list[Path]) -> str | None:
    """The content hash of the files, None while one cannot be read (mid-swap, not mounted yet)."""
    h = hashlib.sha256()
    try:
        for p in paths:
            h.update(p.read_bytes())
            h.update(b"\0")
    except OSError:
        return None
    return h.hexdigest()


async def _poll(app: Litestar, path: Path, interval_s: float) -> None:
    seen = digest([path])
    while True:
        await asyncio.sleep(interval_s)
        current = await asyncio.to_thread(digest, [path])
        if current is None or current == seen:
            continue
        seen = current
        log.info("registry file %s changed; reloading", path)
        app.state.reloader.reload_in_background()


def install(app: Litestar, path: str | Path, interval_s: float) -> None:
    """Poll `path` while the app runs; reload on change. Hooks on the app, so app.py needs no change."""
    tasks: list[asyncio.Task] = []

    async def start(app: Litestar) -> None:
        tasks.append(asyncio.get_running_loop().create_task(_poll(app, Path(path), interval_s)))

    async def stop(app: Litestar) -> None:
        for task in tasks:
            task.cancel()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
