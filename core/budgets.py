"""Token budgets chosen for a model that has no profile for this machine.

Users write plain registry entries; the default must be the fast one. Two rules, both from measurements:

- On a CPU: the budget the benchmark measured fastest per inference thread, times the intra-op threads
  each CPU stream gets. On 2 cores (2 streams x 1 thread), bf16, MiniLM-L6 cross-encoder, pairs per
  CPU-second by budget: 1,024: 52 · 2,048: 53 · 4,096: 51 · 8,192: 46 · 16,384: 41 (padding 99.0 · 97.7 ·
  95.7 · 92.2 · 86.3%; README "What was tuned"). Small batches cost no more per token on a CPU and pad
  less, so the smallest budget at the top of that plateau wins. More threads per stream are given
  proportionally more tokens (each thread keeps the GEMM share that was measured best): an extrapolation
  past the measured 1 thread, and the reason string says so.
- On a GPU: the largest budget whose activations, measured by the warm-up, fit the model's memory budget
  (its `memory_budget_gb`, else an even share of the card) beside its weights, less a margin for the
  caching allocator's fragmentation and the kernels' workspace.
"""

from __future__ import annotations

import os

# bench/: tokens per batch per intra-op thread, fastest on this architecture family at 1 thread per
# stream (the families without a measurement of their own use the encoder figure until `rerank-gateway
# tune` gives them one). Measured: AMD EPYC Zen 4, 2 cores, avx512_bf16 (no AMX), torch 2.13 bf16.
CPU_BEST_TOKENS_PER_THREAD = 1024
CPU_MEASURED_BACKENDS = ("flag", "embedding")
# Fraction of the memory budget a chosen GPU batch may use after the weights: the warm-up measures live
# tensors; fragmentation and cuBLAS/attention workspace come on top.
GPU_MARGIN = 0.10
# The first warm-up on a GPU with no profile runs at this many tokens (or max_length, if larger); the
# chosen budget is then proven by a second warm-up at its own size.
GPU_PROBE_TOKENS = 8192
# Chosen budgets are rounded down to a multiple of this (and never below one full-length pair).
ROUND_TOKENS = 256


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" elsewhere): benchmarks name their machine."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_budget(backend: str, cpu_streams: int, cores: int | None = None) -> tuple[int, str]:
    """(max_batch_tokens, why) for a profile-less model on a CPU."""
    cores = cores or cpu_cores()
    streams = max(1, min(cpu_streams, cores))
    threads = max(1, cores // streams)
    tokens = CPU_BEST_TOKENS_PER_THREAD * threads
    basis = (
        "measured fastest for this architecture family" if backend in CPU_MEASURED_BACKENDS
        else "the encoder cross-encoder's measured best (no CPU measurement of this family yet)"
    )
    extrapolated = "" if threads == 1 else f", scaled from the 1-thread measurement to {threads} threads"
    why = (
        f"auto (no cpu profile): {CPU_BEST_TOKENS_PER_THREAD} tokens per intra-op thread x {threads} "
        f"({cores} cores / {streams} streams), {basis}{extrapolated}; `rerank-gateway tune` measures this machine"
    )
    return tokens, why


def gpu_probe_tokens(max_length: int) -> int:
    return max(GPU_PROBE_TOKENS, max_length)


def gpu_budget(
    *, weights_bytes: int, activation_bytes: int, probe_tokens: int, budget_bytes: float, max_length: int,
    max_tokens: int = 1 << 20,
) -> tuple[int, str]:
    """(max_batch_tokens, why) from one warm-up at probe_tokens: the largest batch whose activations, at the
    measured bytes per token, fit (1 - margin) of what the budget leaves beside the weights.

    Raises ValueError when not even one full-length pair fits."""
    per_token = activation_bytes / max(probe_tokens, 1)
    room = budget_bytes * (1 - GPU_MARGIN) - weights_bytes
    fit = int(room / per_token) if per_token > 0 else max_tokens
    tokens = min(max_tokens, fit // ROUND_TOKENS * ROUND_TOKENS)
    gib = 1024**3
    why = (
        f"auto (no profile for this GPU): {budget_bytes / gib:.2f} GiB budget x {1 - GPU_MARGIN:.0%} - weights "
        f"{weights_bytes / gib:.2f} GiB, at {per_token / 1024:.1f} KiB/token measured by the warm-up at "
        f"{probe_tokens} tokens"
    )
    if tokens < max_length:
        raise ValueError(f"{why}: room for {fit} tokens, less than one pair of max_length {max_length}")
    return tokens, why
