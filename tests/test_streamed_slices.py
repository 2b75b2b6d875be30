"""A big request reaches the device while it is still tokenizing, when its backend packs batches.

The engine tokenizes a request of more than SMALL_REQUEST_DOCS documents in slices on the bulk lane. A
packed (padding-free) backend's slices join the queue as each is ready, so the first batches run while
later slices tokenize; a padded backend's request is queued whole, so its batches stay runs of similar
lengths. Both score exactly as the same documents tokenized and scored in one piece.

On a CPU the packed path is correct, not fast (attention runs pair by pair); that is enough to see the
order of events, which is what is asserted here (tokenizing is slowed a little per slice so that the
order does not depend on the machine's speed).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from backends.flag import FlagBackend
from core.config import effective, model_spec
from engine import Scheduler
from engine.lanes import SMALL_REQUEST_DOCS
from tests import tiny_models as tm

SLICE_DELAY_S = 0.05


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tm.build_xlmr_reranker(tmp_path_factory.mktemp("streamed") / "xlmr")


def load(path, padding_free: str) -> FlagBackend:
    spec = model_spec(backend="flag", source=str(path), max_length=64, dtype="float32", runtime="torch", padding_free=padding_free)
    backend = FlagBackend("m", spec, effective(spec, "cpu"))
    backend.load()
    return backend


def run(backend: FlagBackend, docs: list[str]):
    """Score docs as one request; returns (the answer, when each slice finished tokenizing, when each batch
    was collated)."""
    slice_done: list[float] = []
    collated: list[float] = []
    lock = threading.Lock()
    prepare = backend.prepare

    def slow_prepare(query, documents, **kwargs):
        out = prepare(query, documents, **kwargs)
        time.sleep(SLICE_DELAY_S)
        with lock:
            slice_done.append(time.perf_counter())
        return out

    backend.prepare = slow_prepare
    s = Scheduler(backend, max_batch_tokens=512, max_batch_size=64, max_queue_pairs=10**6, max_queue_tokens=10**8, tokenize_threads=2)
    s.step_hook = lambda step, info: collated.append(time.perf_counter()) if step == "collate" else None
    try:
        done, prepared = asyncio.run(
            s.rerank("kalo mira river", docs, tokenize=dict(max_length=64, max_chunks=1, instruction=None), top_n=len(docs))
        )
    finally:
        s.close()
        del backend.prepare
    return done, prepared, slice_done, collated


def test_a_packed_backend_scores_a_big_request_while_it_tokenizes_and_a_padded_one_queues_it_whole(model_dir):
    docs = tm.sentences(3 * SMALL_REQUEST_DOCS, seed=23, max_words=25)
    packed, padded = load(model_dir, "on"), load(model_dir, "off")
    assert not packed.is_padded and padded.is_padded
    p_done, p_prepared, p_slices, p_batches = run(packed, docs)
    d_done, d_prepared, d_slices, d_batches = run(padded, docs)
    assert len(p_slices) > 4 and len(d_slices) == len(p_slices), "a big request is tokenized in several slices"
    # Packed: the first batch ran before the last slice was tokenized.
    assert p_batches[0] < max(p_slices), "no batch ran while the request was still tokenizing"
    # Padded: queued whole, after every slice.
    assert d_batches[0] > max(d_slices)
    # Either way the request scores as its documents do, metered once.
    assert p_prepared.tokens == d_prepared.tokens and p_prepared.n_items == d_prepared.n_items == len(docs)
    packed_scores = dict(zip(p_done.indices, p_done.scores))
    padded_scores = dict(zip(d_done.indices, d_done.scores))
    assert sorted(packed_scores) == list(range(len(docs)))
    assert max(abs(packed_scores[i] - padded_scores[i]) for i in range(len(docs))) <= 1e-5
