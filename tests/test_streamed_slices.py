"""A big request reaches the device while it is still tokenizing, where that gains time, and a padded
backend's streamed batches pad little.

The engine tokenizes a request of more than SMALL_REQUEST_DOCS documents in slices on the bulk lane
(engine.scheduler.streams_slices). A packed backend's slices, and on a GPU a padded backend's, join the
queue as each is ready, so the first batches run while later slices tokenize; a padded backend's request
is then sliced in order of its documents' lengths, so those first batches are runs of similar lengths, not
every length a slice of the request as it came holds. A padded backend on the CPU queues the request whole.
Every way, the request scores exactly as its documents do, each answered at its own index.

The GPU's policy is asked for here with `stream_slices=True` on the CPU, where a padded backend does not
take it by itself. On a CPU the packed path is correct, not fast (attention runs pair by pair); that is
enough to see the order of events, which is what is asserted here (tokenizing is slowed a little per slice
so that the order does not depend on the machine's speed).
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


def run(backend: FlagBackend, docs: list[str], stream_slices: bool | None = None):
    """Score docs as one request; returns (the answer, when each slice finished tokenizing with its
    documents' character lengths, each batch's collation time, real and padded tokens)."""
    slice_done: list[tuple[float, list[int]]] = []
    collated: list[tuple[float, int, int]] = []
    lock = threading.Lock()
    prepare = backend.prepare

    def slow_prepare(query, documents, **kwargs):
        out = prepare(query, documents, **kwargs)
        time.sleep(SLICE_DELAY_S)
        with lock:
            slice_done.append((time.perf_counter(), [len(d) for d in documents]))
        return out

    backend.prepare = slow_prepare
    s = Scheduler(
        backend, max_batch_tokens=512, max_batch_size=64, max_queue_pairs=10**6, max_queue_tokens=10**8, tokenize_threads=2,
        stream_slices=stream_slices,
    )

    def hook(step, plan):
        if step == "collate":
            collated.append((time.perf_counter(), plan.real_tokens, int(plan.lengths.max()) * len(plan)))

    s.step_hook = hook
    try:
        done = asyncio.run(
            s.rerank("kalo mira river", docs, tokenize=dict(max_length=64, max_chunks=1, instruction=None), top_n=len(docs))
        )
    finally:
        s.close()
        del backend.prepare
    return done, slice_done, collated


@pytest.fixture(scope="module")
def docs():
    # Lengths from 1 to 25 words, shuffled: a slice of the request as it came holds every length.
    return tm.sentences(3 * SMALL_REQUEST_DOCS, seed=23, max_words=25)


@pytest.fixture(scope="module")
def packed(model_dir, docs):
    backend = load(model_dir, "on")
    assert not backend.is_padded
    return run(backend, docs)


def test_a_packed_backend_scores_a_big_request_while_it_tokenizes(packed):
    done, slices, batches = packed
    assert len(slices) > 4, "a big request is tokenized in several slices"
    assert batches[0][0] < max(t for t, _ in slices), "no batch ran while the request was still tokenizing"


def test_a_padded_backend_on_a_gpu_streams_slices_of_similar_lengths_and_scores_each_document_at_its_index(model_dir, docs, packed):
    backend = load(model_dir, "off")
    assert backend.is_padded
    done, slices, batches = run(backend, docs, stream_slices=True)
    assert len(slices) == len(packed[1])
    assert batches[0][0] < max(t for t, _ in slices), "no batch ran while the request was still tokenizing"
    # The slices are runs of lengths (no two overlap), so the batches, those built from the first slices
    # too, pad little: real over padded tokens 0.97-0.98 in five runs here, against 0.90-0.92 with the
    # documents sliced as they came.
    runs = sorted((min(lengths), max(lengths)) for _, lengths in slices)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(runs, runs[1:])), runs
    real, padded_tokens = sum(b[1] for b in batches), sum(b[2] for b in batches)
    assert real / padded_tokens > 0.95, (real, padded_tokens)
    _scores_as_its_documents(backend, docs, done, packed[0])


def test_a_padded_backend_on_the_cpu_queues_a_big_request_whole(model_dir, docs, packed):
    backend = load(model_dir, "off")
    done, slices, batches = run(backend, docs)
    assert len(slices) == len(packed[1])
    assert batches[0][0] > max(t for t, _ in slices)
    _scores_as_its_documents(backend, docs, done, packed[0])


def _scores_as_its_documents(backend: FlagBackend, docs: list[str], done, packed_done) -> None:
    """The padded answer scores every document as the packed one (kept in order) and as the document scored
    alone, and is metered as it."""
    assert done.tokens == packed_done.tokens and done.items == packed_done.items == len(docs)
    packed_scores = dict(zip(packed_done.indices, packed_done.scores))
    padded_scores = dict(zip(done.indices, done.scores))
    assert sorted(packed_scores) == sorted(padded_scores) == list(range(len(docs)))
    assert max(abs(packed_scores[i] - padded_scores[i]) for i in range(len(docs))) <= 1e-5
    for i in (0, 1, 137, len(docs) - 1):
        one = asyncio.run(_score_one(backend, docs[i]))
        assert abs(one - padded_scores[i]) <= 1e-5, i


async def _score_one(backend: FlagBackend, doc: str) -> float:
    s = Scheduler(backend, max_batch_tokens=512, max_batch_size=64, max_queue_pairs=10**6, max_queue_tokens=10**8)
    try:
        done = await s.rerank("kalo mira river", [doc], tokenize=dict(max_length=64, max_chunks=1, instruction=None), top_n=1)
    finally:
        await asyncio.to_thread(s.close)
    return done.scores[0]


def test_a_streamed_request_refused_by_its_last_slice_leaves_nothing_queued_and_the_next_one_scores(model_dir, docs):
    """The longest documents tokenize last when a padded request is sliced by length: a slice check that
    refuses one of them (truncation off) comes after the first slices were queued, and perhaps scored. The
    request fails with the check's error; its queued pairs and its reservation are gone, and a request
    after it scores every document."""
    backend = load(model_dir, "off")
    s = Scheduler(
        backend, max_batch_tokens=512, max_batch_size=64, max_queue_pairs=10**6, max_queue_tokens=10**8, tokenize_threads=2,
        stream_slices=True,
    )
    long_doc = " ".join(["kalo"] * 200)
    refused_docs = [*docs[:150], long_doc, *docs[150:]]
    checked: list[int] = []

    def check(part, doc_ids, chunks):
        checked.append(len(doc_ids))
        if part.cut_docs:
            raise ValueError(f"document {doc_ids[part.cut_docs[0]]} does not fit")

    async def both():
        with pytest.raises(ValueError, match="document 150 does not fit"):
            await s.rerank("kalo mira river", refused_docs, tokenize=dict(max_length=64, max_chunks=1, instruction=None),
                           check=check, top_n=5)
        assert s.queue_depth() == (0, 0) and s._reserved.pairs == 0 and s._reserved.tokens == 0
        return await s.rerank("kalo mira river", docs, tokenize=dict(max_length=64, max_chunks=1, instruction=None), top_n=len(docs))

    try:
        done = asyncio.run(both())
    finally:
        s.close()
    assert len(checked) > 1, "the request was tokenized in slices"
    assert sorted(done.indices) == list(range(len(docs)))
