"""The served registry follows its files: a changed file is picked up without a restart.

On Kubernetes the registry is a ConfigMap and the tenant key hashes are a Secret, both mounted as files
that the kubelet swaps in place when they change. Two small loops keep the gateway in step:

- `rerank-gateway registry-sync` (an init container once, then a sidecar with `--watch`): lays the
  Secret's YAML fragments over the ConfigMap's registry (mappings merged key by key, anything else
  replaced), validates the result whole and writes it atomically. A result that does not validate is
  refused and the last good file stays.
- `serve --watch-registry S`: polls the registry file's content every S seconds and, when it changed,
  reloads it as SIGHUP and POST /admin/reload do (serving.reload: an invalid file is refused, the running
  configuration stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from litestar import Litestar

from core.config import RegistryError, parse_registry, read_yaml

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


def merge(base: Any, overlay: Any) -> Any:
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return overlay


def merged_text(base: Path, overlays: list[Path]) -> str:
    """The merged registry as YAML; RegistryError when a file is unreadable or the result is invalid."""
    data: Any = {}
    for path in [base, *overlays]:
        part = read_yaml(path)
        # An empty source is refused, never taken as "nothing to add": a Secret caught empty must not
        # drop every tenant and leave the gateway open to anyone.
        if not isinstance(part, dict) or not part:
            raise RegistryError(f"{path}: must be a non-empty mapping")
        data = merge(data, part)
    parse_registry(data, f"{base} + {', '.join(map(str, overlays)) or 'no overlays'}")
    return yaml.safe_dump(data, sort_keys=False)


def write_atomic(out: Path, text: str) -> bool:
    """Write when the content differs; True when it was written. A reader never sees half a file."""
    with contextlib.suppress(OSError):
        if out.read_text(encoding="utf-8") == text:
            return False
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    return True


def sync(base: Path, overlays: list[Path], out: Path, *, watch_s: float | None = None, stop: Callable[[], bool] = lambda: False) -> int:
    """Once (exit code 2 on an invalid registry), or forever with `watch_s` (invalid: logged, file kept)."""
    sources = [base, *overlays]
    seen: str | None = None
    while True:
        current = digest(sources)
        if current is not None and current != seen:
            seen = current
            try:
                if write_atomic(out, merged_text(base, overlays)):
                    log.info("registry written to %s from %s", out, ", ".join(map(str, sources)))
            except RegistryError as exc:
                log.error("registry refused, %s keeps the last good one: %s", out, exc)
                if watch_s is None:
                    return 2
        if watch_s is None:
            return 0 if current is not None else 2
        if stop():
            return 0
        time.sleep(watch_s)


async def _poll(app: Litestar, path: Path, interval_s: float) -> None:
    seen = digest([path])
    while True:
        await asyncio.sleep(interval_s)
        current = await asyncio.to_thread(digest, [path])
        if current is None or current == seen:
            continue
        seen = current
        log.info("registry file %s changed; reloading", path)
        app.state.reloader.reload_in_background(app.state)


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
