"""Model backends: tokenizing and scoring a padded batch (the batching engine is the `engine` package)."""

from __future__ import annotations

import importlib

from backends.base import Backend

# backend kind (the registry's `backend:` key) -> "module:Class", imported only when a model uses it.
BACKENDS: dict[str, str] = {
    "embedding": "backends.embedding:EmbeddingBackend",
    "flag": "backends.flag:FlagBackend",
    "gte": "backends.gte:GteBackend",
    "qwen3": "backends.qwen3:Qwen3Backend",
}


def backend_class(kind: str) -> type[Backend]:
    module, _, cls = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)
