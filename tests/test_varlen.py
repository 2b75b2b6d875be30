"""Padding-free batches (backends.varlen): packed pairs score as padded ones, for every encoder
architecture the gateway serves. On a GPU the attention runs on flash-attention's varlen kernel; here, on
the CPU, the same packing, positions, offsets and heads run with per-pair attention, so everything but the
kernel is checked."""

from __future__ import annotations

import pytest
import torch

from backends import backend_class
from bench.models import build_minilm_cross_encoder
from core.config import effective, model_spec
from tests import tiny_models as tm


def load(kind: str, path, **fields):
    spec = model_spec(backend=kind, source=str(path), max_length=96, dtype="float32", runtime="torch", **fields)
    backend = backend_class(kind)("m", spec, effective(spec, "cpu"))
    backend.load()
    return backend


def scores(backend, docs: list[str], max_chunks: int = 1) -> torch.Tensor:
    prepared = backend.prepare("kalo mira river", docs, max_length=96, max_chunks=max_chunks, instruction=None)
    with torch.inference_mode():
        return backend.forward(backend.collate(prepared.rows()))


BUILDERS = {
    "xlm-roberta": ("flag", tm.build_xlmr_reranker),
    "gte": ("gte", tm.build_gte_reranker),
    "bert": ("flag", build_minilm_cross_encoder),
}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_packed_batches_score_as_padded_ones(arch, tmp_path_factory) -> None:
    kind, builder = BUILDERS[arch]
    path = builder(tmp_path_factory.getbasetemp() / f"varlen_{arch}")
    padded, packed = load(kind, path, padding_free="off"), load(kind, path, padding_free="on")
    assert not packed.is_padded and padded.is_padded
    docs = tm.sentences(17, min_words=1, max_words=150)  # 1 to ~150 words: widths differ a lot
    prepared = packed.prepare("q", docs, max_length=96, max_chunks=1, instruction=None)
    batch = packed.collate(prepared.rows())
    real = int(prepared.lengths.sum())
    assert batch.inputs["input_ids"].shape == (1, real)  # no padding at all
    for max_chunks in (1, 3):
        want, got = scores(padded, docs, max_chunks), scores(packed, docs, max_chunks)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5
    assert want.std() > 1e-3  # scores differ between documents: the check has teeth


def test_padding_free_refuses_what_it_cannot_pack(tmp_path_factory) -> None:
    path = tm.build_xlmr_reranker(tmp_path_factory.getbasetemp() / "varlen_xlm-roberta")
    with pytest.raises(RuntimeError, match="padding_free: on needs"):
        load("flag", path, padding_free="on", quantization="int8")
    # On a CPU, auto pads (the packed path is correct there, not faster).
    assert load("flag", path).is_padded


@pytest.mark.parametrize(
    "capability, dtype, runs",
    [
        ((9, 0), torch.bfloat16, True),  # H100 / H200
        ((8, 0), torch.float16, True),  # A100
        ((8, 6), torch.bfloat16, True),  # A10, L4-class
        ((7, 5), torch.float16, False),  # T4: no flash-attention kernel
        ((7, 0), torch.float16, False),  # V100
        ((9, 0), torch.float32, False),  # float32 anywhere
    ],
)
def test_auto_packs_only_where_a_varlen_kernel_runs(capability, dtype, runs) -> None:
    from backends import varlen

    assert varlen.flash_capable(capability, dtype) is runs
    # No CUDA here: the decision for this process's devices is "pair by pair", whatever the dtype.
    assert not varlen.kernel_runs(torch.device("cpu"), dtype)


def test_a_packed_model_reports_no_padding_in_its_metrics(tmp_path_factory) -> None:
    """/metrics counts the tokens a batch's forward computed: a packed batch computes only its real ones.
    The padded twin, on the same documents, shows the padding the packed one saves."""
    from core.config import parse_registry
    from tests.conftest import app_client
    from tests.routes_fixtures import metric

    path = tm.build_xlmr_reranker(tmp_path_factory.getbasetemp() / "varlen_xlm-roberta")
    base = {"backend": "flag", "source": str(path), "max_length": 96, "dtype": "float32", "runtime": "torch"}
    models = {"packed": dict(base, padding_free="on"), "padded": dict(base, padding_free="off")}
    registry = parse_registry({"default_model": "packed", "models": models}, "test-registry")
    docs = tm.sentences(24, min_words=1, max_words=60)
    with app_client(registry) as client:
        for model in models:
            resp = client.post("/v1/rerank", json={"model": model, "query": "kalo mira river", "documents": docs})
            assert resp.status_code == 200, resp.text
        real = {m: metric(client, "rerank_real_tokens_total", model=m) for m in models}
        padded = {m: metric(client, "rerank_padded_tokens_total", model=m) for m in models}
        efficiency = {m: metric(client, "rerank_padding_efficiency", model=m) for m in models}
    assert real["packed"] == real["padded"] > 0
    assert padded["packed"] == real["packed"] and efficiency["packed"] == 1.0
    assert padded["padded"] > real["padded"] and efficiency["padded"] < 0.9
