"""A padded batch's forward reads nothing of its tensors on the host (backends.device_mask): on a GPU such a
read is a device sync, and the inference thread making it would wait, holding the launch lock, for the other
thread's batch on the shared stream. Every padded architecture the gateway serves, through its real backend;
the scores stay those of transformers' own SDPA.

What is caught here is what the host would read: a tensor turned into a Python bool, int, float or list, or
copied to the host, inside the forward (a TorchFunctionMode sees every such call, on any device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from backends import backend_class, device_mask
from core.config import effective, model_spec
from tests import tiny_models as tm

HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Records every call that reads a tensor's values into host Python."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


ARCHITECTURES = {
    "bert": ("flag", tm.build_minilm_tiny_cross_encoder),
    "xlm-roberta": ("flag", tm.build_xlmr_reranker),
    "gte": ("gte", tm.build_gte_reranker),
    "qwen3": ("qwen3", tm.build_qwen3_reranker),
}


def _load(kind: str, path: Path):
    spec = model_spec(backend=kind, source=str(path), max_length=96, dtype="float32", runtime="torch", padding_free="off")
    backend = backend_class(kind)("m", spec, effective(spec, "cpu"))
    backend.load()
    return backend


def _use(model: torch.nn.Module, implementation: str) -> None:
    for sub in model.modules():
        if getattr(sub, "config", None) is not None:
            sub.config._attn_implementation = implementation


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_padded_forward_reads_nothing_on_the_host(arch: str, tmp_path_factory) -> None:
    kind, build = ARCHITECTURES[arch]
    backend = _load(kind, build(tmp_path_factory.getbasetemp() / f"device_mask_{arch}"))
    assert backend.is_padded and backend.model.config._attn_implementation == device_mask.SDPA_DEVICE_MASK
    docs = tm.sentences(9, min_words=1, max_words=60)  # different lengths: every batch holds padding
    batches = [backend.collate(backend.prepare("kalo mira river", docs, max_length=96, max_chunks=1, instruction=None).rows())]
    if kind == "qwen3":
        # Also the rows with no shared prefix (each pair run whole), beside the prefix groups above.
        batches.append(backend.collate(backend.prepare("kalo mira river", docs[:1], max_length=96, max_chunks=1, instruction=None).rows()))
    for batch in batches:
        with torch.inference_mode(), HostReads() as reads:
            got = backend.forward(batch)
        assert reads.seen == [], f"{arch}: the forward read {reads.seen} on the host (a device sync on a GPU)"
        _use(backend.model, "sdpa")  # transformers' own, which asks the host whether the mask can go
        with torch.inference_mode(), HostReads() as reads:
            want = backend.forward(batch)
        _use(backend.model, device_mask.SDPA_DEVICE_MASK)
        assert "__bool__" in reads.seen  # the check has teeth: without this module, the forward reads the mask
        assert (got - want).abs().max() <= 1e-5
        # The tiny Qwen3 scores every document alike (its parity with the official code: tests/test_backends.py).
        assert kind == "qwen3" or want.std() > 1e-3


def test_other_attention_implementations_are_left_alone(tmp_path_factory) -> None:
    from transformers import AutoModelForSequenceClassification

    path = tm.build_xlmr_reranker(tmp_path_factory.getbasetemp() / "device_mask_xlm-roberta")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), attn_implementation="eager")
    assert device_mask.enable(model) is False and model.config._attn_implementation == "eager"
