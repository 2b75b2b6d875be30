"""CPU inference streams: several single-threaded workers share one model's batches, and every request
still gets exactly the scores a lone forward pass gives."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from core.host import CPU_STREAMS
from engine import Scheduler
from backends.flag import FlagBackend
from bench.models import build_minilm_cross_encoder
from core.config import effective, model_spec


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> FlagBackend:
    model_dir = build_minilm_cross_encoder(tmp_path_factory.mktemp("minilm-ce"))
    # float32 so batch composition cannot move a score by more than rounding. torch: the streams are the
    # engine's, whatever runs the model; an exported runtime's streams are tests/test_runtimes.py's (and
    # `auto` would export and time two runtimes first, ~10 s).
    spec = model_spec(backend="flag", source=str(model_dir), max_length=128, dtype="float32", runtime="torch")
    b = FlagBackend("ce", spec, effective(spec, "cpu"))
    b.load()
    return b


def _docs(seed: int, n: int) -> list[str]:
    words = "river bank money loan water fish boat interest rate account stream flow".split()
    g = torch.Generator().manual_seed(seed)
    return [" ".join(words[int(i)] for i in torch.randint(len(words), (int(torch.randint(3, 60, (1,), generator=g)),), generator=g)) for _ in range(n)]


def test_cpu_streams_share_batches_and_keep_scores_exact(backend: FlagBackend) -> None:
    scheduler = Scheduler(backend, max_batch_tokens=256, max_batch_size=64, max_queue_pairs=10_000, max_queue_tokens=10**7)
    seen_threads: set[str] = set()
    scheduler.fault_hook = lambda pairs, tokens: seen_threads.add(threading.current_thread().name)
    requests = [(f"query {k} about money", _docs(k, 12)) for k in range(6)]

    async def one(query: str, docs: list[str]):
        prepared = await scheduler.prepare(query, docs, max_length=128, max_chunks=1, instruction=None)
        return prepared, await scheduler.submit(prepared, top_n=len(docs))

    async def all_at_once():
        return await asyncio.gather(*(one(q, d) for q, d in requests))

    try:
        assert scheduler.streams == CPU_STREAMS
        results = asyncio.run(all_at_once())
    finally:
        scheduler.close()

    # Batches from six concurrent requests were spread over more than one stream.
    assert len(seen_threads) == CPU_STREAMS, seen_threads
    with torch.inference_mode():
        for prepared, done in results:
            alone = torch.stack([backend.forward(backend.collate(prepared.rows([k])))[0] for k in range(prepared.n_items)])
            expected = backend.relevance(alone)
            order = torch.argsort(expected, descending=True).tolist()
            assert sorted(done.indices) == list(range(prepared.n_items))
            got = torch.tensor(done.scores)
            assert torch.allclose(got, expected[done.indices], atol=1e-5)
            # Ranked best first, as a lone forward pass ranks them (ties aside).
            assert torch.allclose(got, expected[order], atol=1e-5)
