"""Real-size memory and speed of the three GPU reranker backends, with random weights (no download).

Builds bge-reranker-large's XLM-R large, gte-multilingual-reranker-base's GTE and Qwen3-Reranker-4B's
Qwen3-4B (quantized to nf4 on load, as the registry serves it) at their real sizes with random weights,
saves each as an ordinary checkpoint, loads it through the real backend class, and runs the engine's
warm-up (one batch at the full token budget) through `Scheduler.warmup`. Reports weights, peak memory,
activation memory per token and tokens/s: the figures `registry.yaml` wants as weights_gb and
activation_kb_per_token.

    python bench/gpu_models.py                 # on a GPU; markdown table on stdout
    python bench/gpu_models.py --tiny          # CPU smoke test with the test suite's tiny models

JSON goes to $OUT/gpu_models.json when OUT is set (or --json PATH). Exits 1 if Qwen3 nf4 at 16,384
tokens peaks at 6 GB or more. Imports torch, transformers, bitsandbytes and this repository only; but
engine imports core.errors. A GPU machine without them can be given
the wheels (about 57 MB, fetched here for its Python, e.g. 3.12):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform any -d wheels \
        transformers==5.23.0 bitsandbytes==0.50.2 msgspec litestar litestar-htmx multipart polyfactory \
        faker rich-click sniffio
    # there: pip install --no-deps --no-index --target /tmp/site wheels/*.whl
    #        PYTHONPATH=/tmp/site:. python bench/gpu_models.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends import backend_class  # noqa: E402
from engine import Scheduler  # noqa: E402
from core.config import effective, model_spec  # noqa: E402
from tests import tiny_models  # noqa: E402  (seeded tokenizers, tiny builders)
from bench.memory import gte_multilingual_base_config, qwen3_4b_config, xlmr_large_config  # noqa: E402

GIB = 1024**3
QWEN3_PEAK_LIMIT_GB = 6.0


@dataclass
class Row:
    model: str
    backend: str
    precision: str
    length: int
    pairs: int
    tokens: int
    weights_gb: float
    peak_gb: float
    activation_kb_per_token: float
    tokens_per_s: float
    tflops: float  # achieved, counting matmul FLOPs of the forward (2 x linear weights + attention)
    peak_fraction: float | None  # of the GPU's dense fp16/bf16 tensor-core peak


# --- real-size architectures (configs in bench/memory.py) --------------------------------------


def build_xlmr_large(path: Path) -> Path:
    from transformers import XLMRobertaForSequenceClassification

    return _save(XLMRobertaForSequenceClassification, xlmr_large_config(), torch.float16, tiny_models.xlmr_tokenizer(), path)


def build_gte_multilingual_base(path: Path) -> Path:
    from transformers import GteForSequenceClassification

    return _save(GteForSequenceClassification, gte_multilingual_base_config(), torch.float16, tiny_models.xlmr_tokenizer(), path)


def build_qwen3_4b(path: Path) -> Path:
    from transformers import Qwen3ForCausalLM

    tokenizer = tiny_models.qwen_tokenizer()
    config = qwen3_4b_config(tokenizer.pad_token_id, tokenizer.eos_token_id)
    # Saved in bf16; the backend quantizes to nf4 while loading, as it does the real checkpoint.
    return _save(Qwen3ForCausalLM, config, torch.bfloat16, tokenizer, path)


def _save(cls, config, dtype: torch.dtype, tokenizer, path: Path) -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    _free()
    return path


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- measurement -------------------------------------------------------------------------------------------


def forward_flops_per_token(model: torch.nn.Module, length: int) -> float:
    """Matmul FLOPs per token of one forward: 2 x every linear layer's weights (lm_head excluded: the
    qwen3 backend never runs it) plus attention's QK^T and AV, 4 x layers x length x hidden."""
    linear = sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if hasattr(m, "in_features") and hasattr(m, "out_features") and "lm_head" not in name
    )
    config = model.config
    # Qwen3's attention width is heads x head_dim (4096), not its hidden size (2560).
    width = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return 2 * linear + 4 * config.num_hidden_layers * length * width


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def measure(name: str, kind: str, path: Path, *, dtype: str, quantization: str, lengths: list[int], max_batch_tokens: int, device: str) -> list[Row]:
    spec = model_spec(
        backend=kind, source=str(path), dtype=dtype, quantization=quantization,  # type: ignore[arg-type]
        max_length=max(lengths), max_batch_tokens=max_batch_tokens, max_batch_size=4096,
    )
    eff = effective(spec, "cpu" if device == "cpu" else "gpu")
    backend = backend_class(kind)(name, spec, eff)
    backend.load()
    weights = backend.weights_bytes()
    scheduler = Scheduler(
        backend, max_batch_tokens=max_batch_tokens, max_batch_size=4096, max_queue_pairs=1, max_queue_tokens=1
    )
    rows = []
    try:
        for length in lengths:
            scheduler.warmup(length)  # first run: kernels, allocator
            runs = [scheduler.warmup(length) for _ in range(3)]
            best = min(runs, key=lambda r: r["seconds"])
            peak = max(r["peak_bytes"] for r in runs)
            activation = max(r["activation_bytes"] for r in runs)
            tokens = int(best["pairs"] * best["length"])
            flops = forward_flops_per_token(backend.model, int(best["length"])) * tokens / best["seconds"]
            peak_tf = peak_tflops(torch.cuda.get_device_name(0)) if device == "cuda" else None
            precision = str(backend.dtype).removeprefix("torch.") + (f" + {quantization}" if quantization != "none" else "")
            rows.append(
                Row(
                    model=name, backend=kind, precision=precision, length=int(best["length"]), pairs=int(best["pairs"]),
                    tokens=tokens, weights_gb=weights / GIB, peak_gb=peak / GIB,
                    activation_kb_per_token=activation / tokens / 1024, tokens_per_s=tokens / best["seconds"],
                    tflops=flops / 1e12, peak_fraction=(flops / 1e12 / peak_tf) if peak_tf else None,
                )
            )
            print(f"  {name} @ {length}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        scheduler.close()
        del scheduler, backend
        _free()
    return rows


def table(rows: list[Row], device_name: str, *, tiny: bool) -> str:
    sizes = "tiny test models" if tiny else "random weights at real size"
    out = [
        f"Device: {device_name}; torch {torch.__version__}; {sizes}; one warm-up batch at the full token budget "
        "(best of 3).",
        "",
        "| model | backend | precision | pairs x length | weights GB | peak GB | activation KB/token | tokens/s | TFLOP/s | of peak |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.model} | {r.backend} | {r.precision} | {r.pairs} x {r.length} | {r.weights_gb:.2f} | "
            f"{r.peak_gb:.2f} | {r.activation_kb_per_token:.1f} | {r.tokens_per_s:,.0f} | {r.tflops:.1f} | "
            f"{'-' if r.peak_fraction is None else f'{r.peak_fraction:.0%}'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="default 16384 (1024 with --tiny)")
    parser.add_argument("--models", default="bge-reranker-large,gte-multilingual-reranker-base,qwen3-reranker-4b")
    parser.add_argument("--workdir", help="where the random checkpoints go (default: a temporary directory)")
    parser.add_argument("--json", help="write the rows as JSON here (default: $OUT/gpu_models.json when OUT is set)")
    args = parser.parse_args(argv)

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        print("no CUDA GPU: run with --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    budget = args.max_batch_tokens or (1024 if args.tiny else 16384)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    half = "auto" if args.tiny else "float16"
    # (registry id, backend kind, builder, dtype, quantization, lengths)
    plans = [
        ("bge-reranker-large", "flag", build_xlmr_large, tiny_models.build_xlmr_reranker, half, "none", [512]),
        ("gte-multilingual-reranker-base", "gte", build_gte_multilingual_base, tiny_models.build_gte_reranker, half, "none", [512, 8192]),
        ("qwen3-reranker-4b", "qwen3", build_qwen3_4b, tiny_models.build_qwen3_reranker, "auto", "nf4", [512, 8192]),
    ]
    wanted = set(args.models.split(","))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        for name, kind, real, tiny, dtype, quant, lengths in plans:
            if name not in wanted:
                continue
            lengths = [min(n, budget) for n in (lengths if not args.tiny else [64, 256])]
            print(f"building {name} ({'tiny' if args.tiny else 'real size'})", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                path = (tiny if args.tiny else real)(root / name)
            except (ImportError, AttributeError) as exc:  # e.g. a transformers without GTE
                print(f"  skipped {name}: {exc}", file=sys.stderr)
                continue
            print(f"  built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            # The encoder throughput figure (issue: >= 40% of peak) is also taken at a larger token budget.
            budgets = [budget] if args.tiny or kind != "flag" else [budget, 4 * budget]
            for b in budgets:
                rows += measure(name, kind, path, dtype=dtype, quantization=quant, lengths=lengths, max_batch_tokens=b, device=device)

    print(table(rows, device_name, tiny=args.tiny))
    json_path = args.json or (os.path.join(os.environ["OUT"], "gpu_models.json") if os.environ.get("OUT") else None)
    if json_path:
        Path(json_path).write_text(json.dumps({"device": device_name, "max_batch_tokens": budget, "rows": [asdict(r) for r in rows]}, indent=2))
    qwen = [r for r in rows if r.backend == "qwen3"]
    if device == "cuda" and budget == 16384 and qwen:
        worst = max(r.peak_gb for r in qwen)
        verdict = "PASS" if worst < QWEN3_PEAK_LIMIT_GB else "FAIL"
        print(f"\n{verdict}: Qwen3 nf4 at {budget} tokens peaks at {worst:.2f} GB (limit {QWEN3_PEAK_LIMIT_GB:g} GB)")
        return 0 if verdict == "PASS" else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
