"""Measured memory of the three real-size reranker architectures, on the CPU, through the real backends.

    python -m bench.memory                       # all three (under `flock /tmp/rerank-heavy.lock` here)
    python -m bench.memory --models qwen3-reranker-4b --budgets 1024,16384
    python -m bench.memory --tiny                # smoke run on the tests' tiny models (seconds)

What it builds. Each architecture at its real size with random weights, cheaply: parameters are created
on the meta device (no memory, no init), then materialised one tensor at a time in bfloat16; Qwen3-4B's
decoder linears go straight to bitsandbytes nf4 (double quantization, as the registry serves it), one
layer's bf16 weight at a time, so the 8 GB bf16 model never exists. The backend itself (tokenizer,
template, pad side, forward) is loaded from a tiny checkpoint of the same architecture with the real
loading code, then given the real-size module: what runs is `backend.collate` + `backend.forward`, the
gateway's own path.

What it measures. Peak live tensor bytes during one forward of a mixed-length batch (rows from the full
length down to half of it, left- or right-padded as the backend pads, so the attention mask is real and
the masked kernels run), at several token budgets. The CPU allocator keeps no statistics (no
`torch.cuda.max_memory_allocated` twin), tracemalloc does not see torch's allocations, and RSS deltas mix
in glibc's caching. So the forward runs under `torch.profiler` with `profile_memory=True`: every
allocation and free through c10's CPU allocator is an event with its size, including those made inside
kernels (workspace, temporaries of a fused op); the running sum of those events, in time order, is the
live tensor bytes, and its maximum the peak. The weights exist before the profile starts, so the peak is
activations (plus the batch's input tensors). Checked against known allocations in the smoke test.

Depth. In inference a layer's intermediates are freed before the next layer runs, so the peak is set
inside one layer and does not grow with depth: measured here at full depth and at 2 layers on the same
batch (the `depth check` rows), after which the budget sweep runs the first 2 layers of the real-size
model (a 4B model's full forward at 16k tokens would take 20 minutes of this CPU per point).

How it differs from a GPU. The CUDA caching allocator rounds blocks (512 B) and holds freed blocks in
its pool, so nvidia-smi shows more than the live bytes (the gateway's warm-up reads
max_memory_allocated, the same live-bytes notion as here); the CUDA context (~0.3-0.5 GB) and cuBLAS
workspace are not tensors. Kernels differ: on a GPU fp16 attention with a padding mask runs the
memory-efficient kernel (no batch x heads x length^2 scores), on this CPU the bf16 SDPA kernel is
blocked too; the math fallback (fp32 on old GPUs, T4 with some shapes) materialises the scores and costs
more. bitsandbytes dequantizes an nf4 weight to 16-bit for a multi-row matmul on both (one weight matrix
at a time, <= 50 MB for Qwen3-4B). fp16 on a GPU and bf16 here have the same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The live-bytes measurement and the mixed-length batch shape are tune's, so both tools measure alike.
from ops.tune import mixed_batch, peak_live_bytes  # noqa: E402

GIB = 1024**3
KIB = 1024
DEFAULT_BUDGETS = [1024, 4096, 16384]
SWEEP_LAYERS = 2


# --- the real-size configurations (shared/notes/models.md) -------------------------------------------------


def xlmr_large_config():
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=1,
    )


def gte_multilingual_base_config():
    from transformers import GteConfig

    head_dim = 768 // 12
    return GteConfig(
        vocab_size=250048, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=8192, type_vocab_size=1, pad_token_id=1, num_labels=1,
        rope_parameters={"rope_type": "linear", "rope_theta": 20000.0 * 8, "factor": 8.0 ** (2 / head_dim)},
    )


def qwen3_4b_config(pad_token_id: int | None = None, eos_token_id: int | None = None):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151669, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
        tie_word_embeddings=True, rms_norm_eps=1e-6, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
    )


@dataclass(frozen=True)
class Arch:
    backend: str
    model_class: str
    config: Callable[[], Any]
    tiny: str  # builder in tests/tiny_models.py
    quantization: str
    lengths: tuple[int, ...]


ARCHS: dict[str, Arch] = {
    "bge-reranker-large": Arch("flag", "XLMRobertaForSequenceClassification", xlmr_large_config, "build_xlmr_reranker", "none", (512,)),
    "gte-multilingual-reranker-base": Arch("gte", "GteForSequenceClassification", gte_multilingual_base_config, "build_gte_reranker", "none", (512, 8192)),
    "qwen3-reranker-4b": Arch("qwen3", "Qwen3ForCausalLM", qwen3_4b_config, "build_qwen3_reranker", "nf4", (512, 2048)),
}


# --- building a real-size model without its full-precision copy --------------------------------------------


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters are created on the meta device (no memory, init is a no-op); buffers (rope frequencies,
    position ids) stay real, computed as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _random(shape, name: str, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name.lower() and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02)


def build_real_size(arch: Arch, config, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The architecture at its real size, random weights in `dtype`; nf4 decoder linears for nf4 archs."""
    import transformers

    cls = getattr(transformers, arch.model_class)
    old_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # buffers and the rare parameter made before the patch: 16-bit
    try:
        with parameters_on_meta():
            model = cls(config)
    finally:
        torch.set_default_dtype(old_default)
    model.eval()
    if arch.quantization == "nf4":
        _quantize_linears(model, dtype)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_meta:
                    full = f"{module_name}.{name}"
                    module._parameters[name] = torch.nn.Parameter(_random(param.shape, full, dtype), requires_grad=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _quantize_linears(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every nn.Linear but lm_head becomes a bitsandbytes Linear4bit (nf4, double quantization, compute in
    `dtype`), as transformers' bitsandbytes loader makes it; each bf16 weight lives only while quantized."""
    import bitsandbytes as bnb

    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name == "lm_head":
                continue
            q = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=dtype,
                compress_statistics=True, quant_type="nf4", device="meta",
            )
            weight = _random((child.out_features, child.in_features), f"{module_name}.{child_name}.weight", dtype)
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q).to("cpu")
            del weight
            if child.bias is not None:
                q.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=dtype), requires_grad=False)
            setattr(module, child_name, q)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Every byte the weights hold: parameters, buffers and the nf4 quantization states (absmax, nested
    absmax, code), which are neither parameters nor buffers."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for v in state.as_dict(packed=False).values():
                if isinstance(v, torch.Tensor):
                    add(v)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
    return total


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    path: str  # "gateway" or "official full logits"
    layers: int
    budget: int
    length: int
    pairs: int
    padded_tokens: int
    real_tokens: int
    weights_gb: float
    peak_activation_gb: float
    activation_kb_per_token: float
    seconds: float


def layers_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.base_model
    for attr in ("layers",):
        if hasattr(base, attr):
            return getattr(base, attr)
    return base.encoder.layer


@contextlib.contextmanager
def truncated(model: torch.nn.Module, layers: int | None):
    """Run only the first `layers` decoder/encoder layers (None: all of them)."""
    holder = model.base_model if hasattr(model.base_model, "layers") else model.base_model.encoder
    attr = "layers" if hasattr(holder, "layers") else "layer"
    full = getattr(holder, attr)
    config = model.config
    old_n = config.num_hidden_layers
    if layers is not None:
        setattr(holder, attr, torch.nn.ModuleList(list(full)[:layers]))
        config.num_hidden_layers = layers
    try:
        yield
    finally:
        setattr(holder, attr, full)
        config.num_hidden_layers = old_n


def measure_batch(backend, name: str, budget: int, length: int, *, weights: int, layers: int | None, official: bool = False) -> Row:
    lengths = mixed_batch(budget, length)
    rows = backend.synthetic_rows(lengths)

    def run():
        with torch.inference_mode():
            batch = backend.collate(rows)
            if official:
                # The official Qwen3-Reranker code: logits over the vocabulary at every position.
                logits = backend.model(**batch.inputs, use_cache=False).logits
                pair = logits[:, -1, [backend.no_id, backend.yes_id]].float()
                return torch.log_softmax(pair, dim=-1)[:, 1]
            return backend.forward(batch)

    gc.collect()
    with truncated(backend.model, layers):
        start = time.perf_counter()
        peak, _ = peak_live_bytes(run)
        seconds = time.perf_counter() - start
    padded = len(lengths) * max(lengths)
    depth = layers or backend.model.config.num_hidden_layers
    row = Row(
        model=name, path="official full logits" if official else "gateway", layers=depth, budget=budget, length=length,
        pairs=len(lengths), padded_tokens=padded, real_tokens=sum(lengths), weights_gb=weights / GIB,
        peak_activation_gb=peak / GIB, activation_kb_per_token=peak / padded / KIB, seconds=seconds,
    )
    print(f"  {row}", file=sys.stderr, flush=True)
    return row


def load_backend(name: str, arch: Arch, tiny_dir: Path, *, tiny: bool):
    """The backend loaded by its real code from a tiny checkpoint, then given the real-size model."""
    from backends import backend_class
    from core.config import effective, model_spec
    from tests import tiny_models

    path = getattr(tiny_models, arch.tiny)(tiny_dir / name)
    spec = model_spec(
        backend=arch.backend, source=str(path), dtype="bfloat16", quantization=arch.quantization,  # type: ignore[arg-type]
        max_length=max(arch.lengths), max_batch_tokens=max(arch.lengths),
        # torch's own forward: the profiler sees its allocations, and a GPU runs torch too.
        runtime="torch",
    )
    backend = backend_class(arch.backend)(name, spec, effective(spec, "cpu"))
    backend.load()
    if tiny:
        return backend
    if arch.backend == "qwen3":
        config = arch.config(backend.tokenizer.pad_token_id, backend.tokenizer.eos_token_id)
    else:
        config = arch.config()
    backend.model = None
    gc.collect()
    backend.model = build_real_size(arch, config, torch.bfloat16)
    if arch.backend == "qwen3":
        w = backend.model.get_output_embeddings().weight
        backend.yes_no = w[backend.yes_id].float() - w[backend.no_id].float()
    return backend


def measure_arch(name: str, budgets: list[int], tmp: Path, *, tiny: bool, depth_check: bool = True) -> list[Row]:
    arch = ARCHS[name]
    start = time.perf_counter()
    backend = load_backend(name, arch, tmp, tiny=tiny)
    weights = tensor_bytes(backend.model)
    print(f"{name}: built in {time.perf_counter() - start:.0f} s, weights {weights / GIB:.3f} GiB", file=sys.stderr, flush=True)
    rows: list[Row] = []
    sweep_layers = None if tiny else SWEEP_LAYERS
    lengths = [min(n, max(budgets)) for n in (arch.lengths if not tiny else (64,))]
    if depth_check and not tiny:
        # The peak is per layer: the full model and its first layers peak alike on the same batch.
        for layers in (None, SWEEP_LAYERS):
            rows.append(measure_batch(backend, name, lengths[0], lengths[0], weights=weights, layers=layers))
    for length in lengths:
        for budget in budgets:
            if budget >= length:
                rows.append(measure_batch(backend, name, budget, length, weights=weights, layers=sweep_layers))
    if arch.backend == "qwen3" and not tiny:
        # The seed's case, 32 documents x 512 tokens: the gateway's path against the official one.
        for official in (False, True):
            rows.append(measure_batch(backend, name, 32 * 512, 512, weights=weights, layers=sweep_layers, official=official))
    del backend
    gc.collect()
    return rows


def table(rows: list[Row]) -> str:
    out = [
        "| model | path | layers run | budget | pairs x width | weights GiB | peak activations GiB | KiB / padded token | s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.model} | {r.path} | {r.layers} | {r.budget} | {r.pairs} x {r.length} | {r.weights_gb:.3f} | "
            f"{r.peak_activation_gb:.3f} | {r.activation_kb_per_token:.1f} | {r.seconds:.1f} |"
        )
    return "\n".join(out)


def machine() -> str:
    from core.host import cpu_model_name

    return f"{cpu_model_name()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ARCHS), help="comma-separated subset of %(default)s")
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="token budgets (default %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models: a smoke run of this script")
    parser.add_argument("--no-depth-check", action="store_true", help="skip the full-depth vs first-layers check")
    parser.add_argument("--json", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    budgets = [int(b) for b in args.budgets.split(",")]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += measure_arch(name, budgets if not args.tiny else [64, 256], Path(tmp), tiny=args.tiny, depth_check=not args.no_depth_check)
    print(f"Measured on the CPU: {machine()}; bf16 activations, random weights at "
          f"{'tiny' if args.tiny else 'real'} size; peak live tensor bytes of one forward (torch.profiler).\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
