"""Shared-prefix scoring for Qwen3 rerankers (backends.qwen3 + backends.prefix_cache): the prefix's
keys/values computed once give the scores of running every pair whole, in batches that mix requests,
chunked documents and pairs with nothing to share; the cache is reused across batches and bounded."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from backends import backend_class
import numpy as np

from backends.base import Rows
from backends.prefix_cache import PrefixCache, SharedPrefix, common_prefix_length
from backends.token_arrays import flatten
from core.config import effective, model_spec
from engine import Scheduler
from observability.metrics import Metrics
from tests import tiny_models as tm


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return tm.build_qwen3_reranker(tmp_path_factory.mktemp("qwen3_prefix") / "qwen3")


def load(path, dtype: str):
    spec = model_spec(backend="qwen3", source=str(path), max_length=160, dtype=dtype)
    backend = backend_class("qwen3")("q", spec, effective(spec, "cpu"))
    backend.load()
    return backend


def mixed_batch(backend):
    """Two requests (one with chunked documents and its own instruction) and a one-document request."""
    docs = tm.sentences(20, min_words=1, max_words=70)
    a = backend.prepare("kalo mira river", docs, max_length=160, max_chunks=1, instruction=None)
    b = backend.prepare("water light", docs[:6] + [""], max_length=96, max_chunks=3, instruction="Judge rivers")
    c = backend.prepare("music", ["city music of the river"], max_length=160, max_chunks=1, instruction=None)
    return (a, b, c), Rows.concat([a.rows(), b.rows(), c.rows()])


def take(rows: Rows, which) -> Rows:
    """Some rows of a batch, in order."""
    offsets = np.concatenate([[0], np.cumsum(rows.lengths)])
    ids, lengths = flatten([rows.ids[offsets[k] : offsets[k + 1]] for k in which])
    return Rows(ids, lengths, None, [rows.contexts[k] for k in which])


def score(backend, rows: Rows, share: bool) -> torch.Tensor:
    backend.share_prefix = share
    with torch.inference_mode():
        return backend.forward(backend.collate(rows))


def test_prefix_path_equals_the_whole_path_in_fp32(qwen3_dir) -> None:
    backend = load(qwen3_dir, "float32")
    requests, rows = mixed_batch(backend)
    # Every pair of a request shares the system prompt, instruction and query, up to "<Document>:".
    head = backend.prefix_ids + backend.tokenizer("<Instruct>: Given", add_special_tokens=False)["input_ids"]
    assert list(rows.contexts[0].ids[: len(head)]) == head
    whole = score(backend, rows, share=False)
    # The budget can count what runs: a shared prefix once, and its keys and values in each row's attention.
    assert engine_cost(requests, backend.prefix_row_share) < int(rows.lengths.max()) * len(rows) * 0.8
    shared = score(backend, rows, share=True)
    assert (shared - whole).abs().max() <= 1e-5
    assert whole.std() > 0.05  # the scores differ between documents: the check has teeth
    # Two prefixes were computed; the one-document request ran whole (nothing to share).
    assert backend.prefixes.misses == 2 and backend.prefixes.hits == 0
    # A later batch of the same requests reuses the cached prefixes.
    n = len(rows)
    again = score(backend, take(rows, [*range(3, 12), *range(n - 4, n)]), share=True)
    assert (again - torch.cat([whole[3:12], whole[-4:]])).abs().max() <= 1e-5
    assert backend.prefixes.hits == 2


def test_prefix_path_in_bf16_is_within_bf16_batching_noise(qwen3_dir) -> None:
    backend = load(qwen3_dir, "bfloat16")
    _, rows = mixed_batch(backend)
    whole = score(backend, rows, share=False)
    shared = score(backend, rows, share=True)
    # bf16 results already move with the batch's composition: each pair alone vs the whole batch.
    alone = torch.cat([score(backend, take(rows, [k]), share=False) for k in range(len(rows))])
    noise = (alone - whole).abs().max().item()
    diff = (shared - whole).abs().max().item()
    assert diff <= max(1e-3, 1.5 * noise), (diff, noise)
    assert (torch.sigmoid(shared) - torch.sigmoid(whole)).abs().max() <= max(1e-3, noise)


def test_a_prefix_batch_holds_one_layer_of_keys_and_values_at_a_time(tmp_path) -> None:
    """Each layer joins the batch's keys and values to the prefix's for its attention and keeps none of them:
    a kept cache would hold every layer's [pairs, heads, prefix + width, dim] to the end of the forward (36
    layers on Qwen3-4B, more than the batch's activations). So on a deep model a prefix batch peaks below
    the same batch run whole, which keeps no cache (CPU allocator, torch's profiler)."""
    from ops.tune import peak_live_bytes

    backend = load(tm.build_qwen3_reranker(tmp_path / "deep", layers=24), "float32")
    _, rows = mixed_batch(backend)
    first = take(rows, range(20))  # request a: twenty pairs behind one prefix
    whole_scores = score(backend, first, share=False)
    score(backend, first, share=True)  # the prefix's keys and values are computed once and cached
    shared_peak, shared_scores = peak_live_bytes(lambda: score(backend, first, share=True))
    whole_peak, _ = peak_live_bytes(lambda: score(backend, first, share=False))
    assert torch.allclose(shared_scores, whole_scores, atol=1e-4)
    assert shared_peak < whole_peak, (shared_peak, whole_peak)


def test_common_prefix_leaves_every_pair_its_last_token() -> None:
    def common(seqs):
        return common_prefix_length(*flatten(seqs))

    assert common([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common([[7, 8, 9], [7, 8, 9]]) == 2  # identical pairs: the last token stays theirs
    assert common([[4], [4, 5]]) == 0
    assert common([]) == 0


def engine_cost(requests, prefix_row_share: float = 0.0) -> int:
    """What the engine's batch builder counts against the token budget for these requests in one batch."""
    from engine.batching import BatchCost, Group, Plan
    from engine.work import new_work

    groups = []
    for p in requests:
        work = new_work(top_n=1, raw_scores=False, tenant="", priority=0, docs=p.n_docs)
        part = work.add(p, np.arange(p.n_docs))
        groups.append(Group(work, part, np.arange(p.n_items)))
    plan = Plan(groups, np.concatenate([p.lengths for p in requests]), 0)
    return BatchCost(is_padded=True, prefix_row_share=prefix_row_share).of_plan(plan)


def test_prefix_cache_is_bounded_in_bytes() -> None:
    kv = [(torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4))]  # 640 bytes
    cache = PrefixCache(max_bytes=1500)
    for k in range(4):
        cache.get_or_compute(SharedPrefix([k]), lambda p: kv)
    assert SharedPrefix([3]) in cache and SharedPrefix([2]) in cache
    assert SharedPrefix([0]) not in cache and SharedPrefix([1]) not in cache
    cache.get_or_compute(SharedPrefix([2]), lambda p: pytest.fail("a cached prefix is not recomputed"))
    assert cache.hits == 1


def test_metrics_count_the_tokens_a_prefix_batch_computes(qwen3_dir) -> None:
    """/metrics' computed ("padded") tokens and the measured rate count a request's shared prefix once and its
    share of each row's attention, as the token budget does: not every pair run whole at the batch's width."""
    backend = load(qwen3_dir, "float32")
    metrics = Metrics()
    s = Scheduler(backend, max_batch_tokens=8192, max_batch_size=64, max_queue_pairs=10_000, max_queue_tokens=10**7, metrics=metrics, streams=1)
    docs = tm.sentences(12, min_words=3, max_words=40)
    try:
        async def run():
            prepared = await s.prepare("kalo mira river", docs, max_length=160, max_chunks=1, instruction=None)
            done = await s.submit(prepared, top_n=len(docs))
            return prepared, done

        prepared, done = asyncio.run(asyncio.wait_for(run(), 120))
        assert sorted(done.indices) == list(range(len(docs)))
        lengths, shared = prepared.lengths, prepared.shared
        assert shared > 10 and len(set(lengths.tolist())) > 1
        computed = shared + len(lengths) * (int(lengths.max()) - shared + math.ceil(shared * backend.prefix_row_share))
        line = next(x for x in metrics.render().decode().splitlines() if x.startswith('rerank_padded_tokens_total{model="q"}'))
        assert float(line.split()[-1]) == computed < len(lengths) * int(lengths.max())
    finally:
        s.close()


def test_a_big_request_streamed_by_length_scores_as_queued_whole(qwen3_dir) -> None:
    """On a GPU a padded backend's big request is queued slice by slice, sliced by length (engine.scheduler.
    streams_slices): every Qwen3 slice finds its own shared prefix, and a batch may hold pairs of several
    slices. Each document scores as when the request is queued whole (the CPU's way), at its own index,
    metered alike."""
    from engine.lanes import SMALL_REQUEST_DOCS

    backend = load(qwen3_dir, "float32")
    docs = tm.sentences(SMALL_REQUEST_DOCS + 64, min_words=1, max_words=40, seed=5)
    docs[7] = "kalo mira " + docs[7]  # documents that share first words with the query's tail
    docs[300] = "kalo mira " + docs[300]

    async def rerank(stream: bool):
        s = Scheduler(
            backend, max_batch_tokens=2048, max_batch_size=64, max_queue_pairs=10_000, max_queue_tokens=10**7,
            tokenize_threads=2, stream_slices=stream,
        )
        try:
            return await s.rerank("kalo mira river", docs, tokenize=dict(max_length=160, max_chunks=1, instruction=None), top_n=len(docs))
        finally:
            await asyncio.to_thread(s.close)

    streamed, whole = asyncio.run(rerank(True)), asyncio.run(rerank(False))
    a, b = dict(zip(streamed.indices, streamed.scores)), dict(zip(whole.indices, whole.scores))
    assert sorted(a) == sorted(b) == list(range(len(docs)))
    assert max(abs(a[i] - b[i]) for i in range(len(docs))) < 1e-4
    assert (streamed.tokens, streamed.items) == (whole.tokens, whole.items) and streamed.items == len(docs)


def test_a_prefix_group_the_budget_allows_fits_in_a_plain_batch_of_its_cost(qwen3_dir) -> None:
    """A long query over short documents. The rows run only their own tokens, but each layer's attention
    holds the prefix's keys and values for every row. Counted as the prefix once plus the rows' tails, a
    group the budget allowed peaked far above a plain batch of the same cost, the batch whose memory the
    warm-up measures and the budget is sized from. With each row charged its share of the prefix
    (Backend.prefix_row_share), it peaks no higher than that batch (CPU allocator, torch's profiler; the
    prefix's keys and values cached first, as a request's later batches find them)."""
    from types import SimpleNamespace

    from backends.base import Prepared
    from backends.qwen3 import prefix_row_share
    from ops.tune import peak_live_bytes

    # Qwen3-4B's config: 2 x (8 + 32) x 128 / (2,560 + 3 x 9,728); without grouped-query attention, every head.
    qwen3_4b = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, head_dim=128)
    assert round(prefix_row_share(SimpleNamespace(**qwen3_4b, num_key_value_heads=8)), 3) == 0.323
    assert prefix_row_share(SimpleNamespace(**qwen3_4b)) == 2 * 64 * 128 / (2560 + 3 * 9728)

    backend = load(qwen3_dir, "float32")
    budget, prefix, tail = 2048, 400, 8
    head = (np.arange(prefix, dtype=np.int32) % 500) + 5

    def request(n: int) -> Prepared:
        ids, lengths = flatten([np.concatenate([head, (np.arange(tail, dtype=np.int32) + k) % 500 + 5]) for k in range(n)])
        return Prepared(ids=ids, lengths=lengths, doc_index=np.arange(n, dtype=np.int32), n_docs=n,
                        context=SharedPrefix(head), tokens=int(lengths.sum()), shared=prefix)

    def allowed(share: float) -> int:
        """The most rows of the request the budget lets into one batch."""
        n = 1
        while engine_cost([request(n + 1)], share) <= budget:
            n += 1
        return n

    def peak(rows: Rows) -> int:
        with torch.inference_mode():
            backend.forward(backend.collate(rows))
            return peak_live_bytes(lambda: backend.forward(backend.collate(rows)))[0]

    plain = peak(backend.synthetic_rows([64] * (budget // 64)))
    charged, uncharged = allowed(backend.prefix_row_share), allowed(0.0)
    assert charged < uncharged == (budget - prefix) // tail
    within = peak(request(charged).rows())
    assert within <= plain, (within, plain)
    # The check has teeth: what the old count let in (here ~13x; 0.57x with the share, 2026-12-07).
    assert peak(request(uncharged).rows()) > 2 * plain

    # The engine builds its batches by the same count: a real Scheduler at this budget runs the request in
    # batches of at most `charged` rows, each within the budget, and answers every document.
    s = Scheduler(backend, max_batch_tokens=budget, max_batch_size=256, max_queue_pairs=10_000, max_queue_tokens=10**7, streams=1)
    sizes: list[int] = []
    s.step_hook = lambda step, info: sizes.append(len(info.lengths)) if step == "collate" else None
    try:
        done = asyncio.run(asyncio.wait_for(s.submit(request(60), top_n=60), 120))
    finally:
        s.close()
    assert sorted(done.indices) == list(range(60))
    assert sum(sizes) == 60 and max(sizes) == charged, sizes
