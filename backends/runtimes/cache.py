"""The on-disk cache of exported models (ONNX, OpenVINO IR) and of `runtime: auto`'s measurements.

An export is made once per (model, revision, runtime, precision, exporter versions) and kept in a folder
of its own with a manifest holding the sha256 of every file. A folder whose manifest is missing, names a
different key, or whose files do not hash to it (a crash mid-write, a disk error, a hand edit) is deleted
and rebuilt: a broken export is never served. Exports are built in a temporary folder and renamed into
place, so a reader sees a whole export or none; two processes building the same export at once both
succeed and one copy is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("rerank_gateway.runtimes")

MANIFEST = "manifest.json"
# Bumped when the export code changes what it writes: old exports then miss and are rebuilt.
EXPORT_FORMAT = 2  # 2: OpenVINO IR from the PyTorch frontend (was via ONNX)


def cache_root() -> Path:
    """$RERANK_GATEWAY_CACHE, else $XDG_CACHE_HOME/rerank-gateway, else ~/.cache/rerank-gateway."""
    explicit = os.environ.get("RERANK_GATEWAY_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rerank-gateway"


def model_revision(path: str) -> str:
    """What identifies the weights: the hub snapshot's commit for a hub id, else a digest of the
    directory's files (name, size, modification time)."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return "dir-" + h.hexdigest()[:16]
    from transformers.utils import cached_file

    config = Path(cached_file(path, "config.json"))
    return config.parent.name  # .../snapshots/<commit>/config.json


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[-60:].strip("_") or "model"


def verify(folder: Path, key: dict[str, Any]) -> str | None:
    """None when the export in `folder` is whole and made for `key`; else what is wrong with it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"manifest unreadable ({exc.__class__.__name__})"
    if manifest.get("key") != key:
        return "manifest is for another key"
    files = manifest.get("files") or {}
    if not files:
        return "manifest lists no files"
    for name, digest in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if file_sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def cached_export(name: str, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """The folder holding the export for `key`, building it with build(folder) when it is absent or
    broken. `build` writes files into the folder it is given; every file it leaves there is checksummed."""
    root = cache_root()
    folder = root / f"{_slug(name)}-{key_digest(key)}"
    if folder.exists():
        problem = verify(folder, key)
        if problem is None:
            return folder
        log.warning("export cache %s is broken (%s): rebuilding it", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        build(tmp)
        files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=2), encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished the same export first: keep theirs if it is whole.
            if verify(folder, key) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def invalidate(folder: Path) -> None:
    """Drop an export that failed to load, so the next load rebuilds it."""
    shutil.rmtree(folder, ignore_errors=True)


def read_choice(key: dict[str, Any]) -> dict[str, Any] | None:
    """A decision `runtime: auto` stored for `key`, or None."""
    path = cache_root() / "auto" / f"{key_digest(key)}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("key") == key else None


def write_choice(key: dict[str, Any], choice: dict[str, Any]) -> None:
    folder = cache_root() / "auto"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key_digest(key)}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"key": key, **choice}, indent=2), encoding="utf-8")
    os.replace(tmp, folder / f"{key_digest(key)}.json")
