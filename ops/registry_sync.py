"""`rerank-gateway registry-sync`: the registry file a gateway serves, merged from its sources.

On Kubernetes the registry is a ConfigMap and the tenant key hashes are a Secret, both mounted as files
that the kubelet swaps in place when they change. `registry-sync` (an init container once, then a sidecar
with `--watch`) lays the Secret's YAML fragments over the ConfigMap's registry (mappings merged key by key,
anything else replaced), validates the result whole and writes it atomically. A result that does not
validate is refused and the last good file stays. The gateway follows the file it writes with
`serve --watch-registry` (serving.registry_watch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from core.config import RegistryError, parse_registry, read_yaml
from serving.registry_watch import digest

log = logging.getLogger("rerank_gateway.registry_sync")


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
