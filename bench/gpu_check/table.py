"""b. Memory and speed of the three real-size architectures (random weights), each loaded through its real
backend class and run by the engine's own warm-up (Scheduler.warmup: one batch of mixed lengths at the full
token budget, the worst padding the batcher allows), as the first GPU run measured it, with honest figures:
tokens/s, TFLOP/s and "of peak" count REAL tokens (a padded mixed batch is ~half padding; a packed
one computes only its real tokens, and its peak is the warm-up's full-budget batch of real ones) and "of peak" is
against the matmul measured in section a of the same run. Where the engine offers `measure_rate` (a full
batch of typical ~128-token pairs at the budget, device-timed), that row is taken too.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from bench.gpu_check.checkpoints import ensure
from bench.gpu_check.flops import flop_model, of_peak, tflops
from bench.gpu_check.plan import Plan
from bench.gpu_check.record import Recorder

GIB = 1024**3
# registry id -> (checkpoint, backend kind, dtype on a GPU, quantization)
MODELS = {
    "bge-reranker-large": ("xlmr_large", "flag", "float16", "none"),
    "gte-multilingual-reranker-base": ("gte_base", "gte", "float16", "none"),
    "qwen3-reranker-4b": ("qwen3_4b", "qwen3", "auto", "nf4"),
}


def _lengths_of(kind: str, pairs: int, width: int) -> list[int]:
    """The warm-up batch's lengths (engine.warmup.mixed_lengths; its spread from width down to 2 if the
    engine no longer has that function)."""
    try:
        from engine.warmup import mixed_lengths

        return list(mixed_lengths(pairs, width))
    except ImportError:
        return [width if pairs == 1 else width - (width - 2) * k // (pairs - 1) for k in range(pairs)]


def _rate_lengths(budget: int, length: int) -> list[int] | None:
    try:
        from engine.warmup import rate_shape

        return list(rate_shape(budget, length))
    except ImportError:
        return None


def measure_model(rec: Recorder, plan: Plan, ctx: dict, model_id: str) -> None:
    from backends import backend_class
    from core.config import effective, model_spec
    from engine import Scheduler

    checkpoint, kind, dtype, quant = MODELS[model_id]
    path, built = ensure(checkpoint, plan.work, plan.smoke)
    cuda = torch.cuda.is_available()
    lengths = plan.table_lengths[model_id]
    budget = plan.table_budget
    spec = model_spec(
        backend=kind, source=str(path), dtype=dtype if cuda else "auto", quantization=quant,  # type: ignore[arg-type]
        max_length=max(lengths), max_batch_tokens=budget, max_batch_size=4096, **plan.entry_extra,
    )
    eff = effective(spec, "gpu" if cuda else "cpu")
    backend = backend_class(kind)(model_id, spec, eff)
    backend.load()
    fm = flop_model(path)
    ceiling_key = "matmul_bf16" if backend.dtype == torch.bfloat16 else "matmul_fp16"
    ceiling = ((ctx.get("ceilings") or {}).get(ceiling_key) or {}).get("tflops")
    scheduler = Scheduler(backend, max_batch_tokens=budget, max_batch_size=4096, max_queue_pairs=1, max_queue_tokens=1)
    rows: list[dict[str, Any]] = []
    try:
        for length in lengths:
            with rec.step(f"{model_id}@{length}"):
                scheduler.warmup(length)  # kernels, allocator
                runs = [scheduler.warmup(length) for _ in range(3)]
                best = min(runs, key=lambda r: r["seconds"])
                batch = _lengths_of(kind, int(best["pairs"]), int(best["length"]))
                real = int(best.get("real_tokens") or sum(batch))
                if backend.is_padded:
                    padded = int(best.get("padded_tokens") or best["pairs"] * best["length"])
                    largest, largest_real = padded, real  # the mixed batch is the widest rectangle run
                else:
                    # A packed batch computes its real tokens. The warm-up's other shapes (its "shapes":
                    # [pairs, longest] each) are full batches of real tokens, and the peak is the largest's.
                    padded = real
                    largest = largest_real = max([real, *(int(n) * int(w) for n, w in best["shapes"][1:])])
                activation = max(r["activation_bytes"] for r in runs)
                flops = fm.total(batch)
                row = {
                    "model": model_id, "backend": kind, "checkpoint_build_s": built,
                    "precision": str(backend.dtype).removeprefix("torch.") + (f" + {quant}" if quant != "none" else ""),
                    "budget": budget, "pairs": int(best["pairs"]), "length": int(best["length"]),
                    "real_tokens": real, "padded_tokens": padded, "weights_gib": backend.weights_bytes() / GIB,
                    "peak_gib": max(r["peak_bytes"] for r in runs) / GIB,
                    "packed": not backend.is_padded,
                    "activation_kib_per_padded_token": activation / largest / 1024,
                    "activation_kib_per_real_token": activation / largest_real / 1024,
                    "seconds": best["seconds"], "real_tokens_per_s": real / best["seconds"],
                    "tflops": tflops(flops, best["seconds"]), "ceiling": ceiling_key,
                }
                row["of_peak"] = of_peak(row["tflops"], ceiling)
                measure_rate = getattr(scheduler, "measure_rate", None)
                typical = _rate_lengths(budget, length)
                if measure_rate is not None and typical:
                    rate = measure_rate(budget, length)
                    t = tflops(fm.total(typical), rate["seconds"])
                    row["typical"] = {
                        "pairs": rate["pairs"], "real_tokens": rate["tokens"], "real_tokens_per_s": rate["tokens_per_s"],
                        "tflops": t, "of_peak": of_peak(t, ceiling), "peak_gib": rate["peak_bytes"] / GIB,
                    }
                rows.append(row)
                rec.put(model_id, rows)
    finally:
        scheduler.close()
        del scheduler, backend
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def encoders(rec: Recorder, plan: Plan, ctx: dict) -> None:
    for model_id in ("bge-reranker-large", "gte-multilingual-reranker-base"):
        with rec.step(model_id):
            measure_model(rec, plan, ctx, model_id)


def qwen3(rec: Recorder, plan: Plan, ctx: dict) -> None:
    measure_model(rec, plan, ctx, "qwen3-reranker-4b")
