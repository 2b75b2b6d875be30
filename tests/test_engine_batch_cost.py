"""The batch builder budgets a batch as the backend runs it (Backend.is_padded): a padding-free (packed)
batch costs its real tokens, so short pairs ride along with a long one that a padded budget (longest x
count) would have sent alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from backends.flag import FlagBackend
from bench.models import build_minilm_cross_encoder
from core.config import effective, model_spec
import engine.scheduler
from engine import Scheduler
from engine.batching import SMALL_SHARE
from engine.scheduler import SEARCH_RUN_SHARE

BUDGET = 256


def load(model_dir, padding_free: str) -> FlagBackend:
    spec = model_spec(backend="flag", source=str(model_dir), max_length=128, dtype="float32", runtime="torch", padding_free=padding_free)
    backend = FlagBackend("ce", spec, effective(spec, "cpu"))
    backend.load()
    return backend


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_minilm_cross_encoder(tmp_path_factory.mktemp("minilm-ce-cost"))


def run(backend: FlagBackend, docs: list[str]) -> tuple[list[list[int]], list[float]]:
    """Score docs in one request through a scheduler; returns the pair lengths of every batch collated."""
    batches: list[list[int]] = []
    collate = backend.collate

    def recording(rows):  # records, then runs the backend's own collate
        batches.append(rows.lengths.tolist())
        return collate(rows)

    backend.collate = recording
    scheduler = Scheduler(backend, max_batch_tokens=BUDGET, max_batch_size=64, max_queue_pairs=10_000, max_queue_tokens=10**7, streams=1)

    async def go():
        prepared = await scheduler.prepare("alpha gamma", docs, max_length=128, max_chunks=1, instruction=None)
        return await scheduler.submit(prepared, top_n=len(docs), raw_scores=True)

    try:
        done = asyncio.run(go())
    finally:
        scheduler.close()
        del backend.collate
    scores = dict(zip(done.indices, done.scores))
    return batches, [scores[i] for i in range(len(docs))]


def test_packed_batches_are_budgeted_by_their_real_tokens(model_dir) -> None:
    long_doc = " ".join(f"word{k}" for k in range(200))  # truncated to max_length: the widest pair
    docs = [long_doc] + [f"short doc {k}" for k in range(12)]
    packed = load(model_dir, "on")
    assert not packed.is_padded
    batches, scores = run(packed, docs)
    assert all(sum(b) <= BUDGET for b in batches), batches
    # Without the backend's cost the long pair goes alone: 12 short pairs + it are 13 x 128 padded tokens.
    assert any(max(b) * len(b) > BUDGET for b in batches), f"no batch packed past its padded size: {batches}"
    assert len(batches) == 1, batches

    padded = load(model_dir, "off")
    padded_batches, padded_scores = run(padded, docs)
    assert all(max(b) * len(b) <= BUDGET for b in padded_batches), padded_batches
    assert len(padded_batches) >= 2
    assert scores == pytest.approx(padded_scores, abs=1e-4)


def test_a_packed_backend_warms_up_with_the_budget_in_real_tokens(model_dir) -> None:
    """Packed batches fill the budget with real tokens, so the warm-up (which proves the budget's memory at
    load) runs such a batch too, not only the mixed-length one whose real tokens are about half."""
    scheduler = Scheduler(load(model_dir, "on"), max_batch_tokens=BUDGET, max_batch_size=64, max_queue_pairs=10, max_queue_tokens=10**6, streams=1)
    try:
        warm = scheduler.warmup(64)
    finally:
        scheduler.close()
    assert warm["real_tokens"] < BUDGET * 0.6  # the mixed batch
    assert [4, 64] in warm["shapes"][1:], warm["shapes"]  # and 4 x 64 real tokens = the budget


def searches_batches(backend: FlagBackend) -> list[int]:
    """96 searches of 3 documents, queued while the stream is busy, then scored: the tokens each batch cost."""
    scheduler = Scheduler(backend, max_batch_tokens=BUDGET, max_batch_size=64, max_queue_pairs=10_000, max_queue_tokens=10**7, streams=1)
    computed: list[int] = []
    held = threading.Event()

    def hold_the_first(pairs: int, tokens: int) -> None:
        computed.append(tokens)
        if len(computed) == 1:
            held.wait(120)  # the stream is busy while the searches queue (released once they all are)

    scheduler.fault_hook = hold_the_first
    searches = [[f"short doc {k} {j}" for j in range(3)] for k in range(96)]
    tokenize = {"max_length": 128, "max_chunks": 1, "instruction": None}

    async def go():
        first = asyncio.ensure_future(scheduler.rerank("alpha", ["one doc"], tokenize=tokenize, top_n=1))
        while not computed:
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(scheduler.rerank("alpha gamma", docs, tokenize=tokenize, top_n=3)) for docs in searches]
        while scheduler.queue_depth()[0] < 288:
            await asyncio.sleep(0.01)
        held.set()
        return await asyncio.gather(first, *queued)

    try:
        done = asyncio.run(go())
    finally:
        scheduler.close()
    assert all(len(d.indices) == 3 for d in done[1:])
    # Each search is small (its tokens at most 1/SMALL_SHARE of the budget); together they are 288 pairs.
    assert all(d.tokens * SMALL_SHARE <= BUDGET for d in done[1:])
    return computed[1:]


def test_a_searchs_leftover_pairs_keep_the_whole_budget_on_a_packed_backend(model_dir, monkeypatch) -> None:
    """While searches arrive, a bulk request's batches are cut (to a share of the budget, on a GPU to a time)
    so that a search waits little behind them. A search's own pairs are not bulk work: on a packed backend,
    when a batch took part of a search as fillers, the rest goes in a full batch, not in cut ones. (At a GPU's
    budget every 20-document request is a search: 16 clients' leftovers ran in batches a third smaller, each
    with its launches.) A padded backend's leftover runs stay cut: narrower, they pad less."""
    # Searches count as arriving for SEARCH_RECENT_S after the last one queued; a loaded machine can take longer
    # than that to queue and score 96 of them, and the cut is what is under test here.
    monkeypatch.setattr(engine.scheduler, "SEARCH_RECENT_S", 600.0)
    packed = searches_batches(load(model_dir, "on"))
    assert sum(packed) > 2 * BUDGET
    # Every batch but the last is more than the share a bulk request's run is cut to while searches arrive.
    assert all(b > BUDGET // SEARCH_RUN_SHARE for b in packed[:-1]), packed
    padded = searches_batches(load(model_dir, "off"))
    assert any(b <= BUDGET // SEARCH_RUN_SHARE for b in padded[:-1]), padded
