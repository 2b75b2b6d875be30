"""A batch's forward reads nothing of its tensors on the host: on a GPU such a read is a device sync, and the
inference thread making it would wait, holding the launch lock, for the other thread's batch on the shared
stream. Every architecture the gateway serves, through its real backend: padded (backends.device_mask: the
scores stay those of transformers' own SDPA) and packed on the varlen kernel's path (backends.varlen, with a
CPU stand-in for the kernel: the scores stay the padded ones).

What is caught here is what the host would read: a tensor turned into a Python bool, int, float or list, copied
to the host, or an op whose output size depends on the values (nonzero, a boolean index) inside the forward (a
TorchFunctionMode sees every such call, on any device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from backends import backend_class, device_mask
from core.config import effective, model_spec
from tests import tiny_models as tm

HOST_READS = {
    "__bool__", "__int__", "__float__", "__index__", "__contains__", "__iter__", "item", "tolist", "cpu", "numpy",
    # output sizes that depend on the values: the host waits for them
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "repeat_interleave", "bincount",
}


class HostReads(TorchFunctionMode):
    """Records every call that reads a tensor's values into host Python, with the tensor read."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.Tensor | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        boolean_index = name == "__getitem__" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if isinstance(args[1], tuple) else (args[1],))
        )
        if name in HOST_READS or boolean_index:
            self.seen.append((name, args[0] if args and isinstance(args[0], torch.Tensor) else None))
        return func(*args, **(kwargs or {}))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.seen]


ARCHITECTURES = {
    "bert": ("flag", tm.build_minilm_tiny_cross_encoder),
    "xlm-roberta": ("flag", tm.build_xlmr_reranker),
    "gte": ("gte", tm.build_gte_reranker),
    "qwen3": ("qwen3", tm.build_qwen3_reranker),
}


def _load(kind: str, path: Path, padding_free: str = "off"):
    spec = model_spec(backend=kind, source=str(path), max_length=96, dtype="float32", runtime="torch", padding_free=padding_free)
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
        assert reads.names == [], f"{arch}: the forward read {reads.names} on the host (a device sync on a GPU)"
        _use(backend.model, "sdpa")  # transformers' own, which asks the host whether the mask can go
        with torch.inference_mode(), HostReads() as reads:
            want = backend.forward(batch)
        _use(backend.model, device_mask.SDPA_DEVICE_MASK)
        assert "__bool__" in reads.names  # the check has teeth: without this module, the forward reads the mask
        assert (got - want).abs().max() <= 1e-5
        # The tiny Qwen3 scores every document alike (its parity with the official code: tests/test_backends.py).
        assert kind == "qwen3" or want.std() > 1e-3


def test_other_attention_implementations_are_left_alone(tmp_path_factory) -> None:
    from transformers import AutoModelForSequenceClassification

    path = tm.build_xlmr_reranker(tmp_path_factory.getbasetemp() / "device_mask_xlm-roberta")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), attn_implementation="eager")
    assert device_mask.enable(model) is False and model.config._attn_implementation == "eager"


def _varlen_on_the_cpu(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
    """What the varlen kernel computes, [tokens, heads, dim] in and out, each pair attending to itself only,
    with device ops alone (the pairs' bounds are never read on the host)."""
    tokens = torch.arange(q.shape[0], device=q.device)
    pair = torch.searchsorted(cu_q[1:].to(torch.int64), tokens, right=True)
    same = pair[:, None] == pair[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=same, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "gte"])
def test_a_packed_forward_on_the_kernel_s_path_reads_only_its_host_side_length(arch: str, tmp_path_factory, monkeypatch) -> None:
    """The packed path as it runs on a GPU (backends.varlen: kernel_runs), the kernel replaced by a CPU
    computation of the same: outside the kernel the forward reads only the batch's longest pair, which
    varlen.pack keeps on the host for the kernel's Python int; and the scores are the padded ones."""
    from backends import varlen

    kind, build = ARCHITECTURES[arch]
    path = build(tmp_path_factory.getbasetemp() / f"device_mask_{arch}")
    padded, packed = _load(kind, path), _load(kind, path, padding_free="on")
    monkeypatch.setattr(varlen, "kernel_runs", lambda device, dtype: True)
    monkeypatch.setattr(varlen, "_gpu_kernel", lambda: (_varlen_on_the_cpu, True))
    docs = tm.sentences(9, min_words=1, max_words=60)
    prepared = packed.prepare("kalo mira river", docs, max_length=96, max_chunks=1, instruction=None)
    batch = packed.collate(prepared.rows())
    with torch.inference_mode(), HostReads() as reads:
        got = packed.forward(batch)
    assert all(tensor is batch.inputs["max_length"] for _, tensor in reads.seen), f"{arch}: read on the host: {reads.names}"
    with torch.inference_mode():
        want = padded.forward(padded.collate(prepared.rows()))
    assert (got - want).abs().max() <= 1e-5 and want.std() > 1e-3
