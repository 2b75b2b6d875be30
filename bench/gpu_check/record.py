"""A section's results, written to its part file after every step: a section killed at its time limit, or a
step that fails, loses nothing recorded before it."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, tuples lists, numpy scalars plain numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return clean(value.item())
        except (TypeError, ValueError):
            return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def write_json(path: Path, data: Any) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=1, allow_nan=False))
    os.replace(tmp, path)


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"result": {}, "errors": {}, "steps": {}}
        self.flush()

    def put(self, key: str, value: Any) -> None:
        self.data["result"][key] = value
        self.flush()

    def get(self, key: str, default: Any = None) -> Any:
        return self.data["result"].get(key, default)

    def error(self, name: str, exc: BaseException) -> None:
        self.data["errors"][name] = f"{type(exc).__name__}: {exc}".strip()[:600]
        self.flush()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A step whose failure is recorded and does not stop the section's later steps."""
        start = time.perf_counter()
        print(f"[step] {name}", file=sys.stderr, flush=True)
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is a recorded result, never a lost section
            traceback.print_exc()
            self.error(name, exc)
        finally:
            self.data["steps"][name] = round(time.perf_counter() - start, 2)
            self.flush()

    def flush(self) -> None:
        write_json(self.path, self.data)
