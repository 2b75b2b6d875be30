"""Facts about the machine this process runs on: its cores, its CPU's model and kind, how the cores split
among CPU inference streams, and the CUDA device's name. Read here once; budgets, backends, the engine,
the runtimes and the benchmarks all ask this module.

No torch at import: the CUDA name imports it only when asked (the planner runs without a model loaded).
"""

from __future__ import annotations

import functools
import os

# Inference streams per model on a CPU (engine.streams): each runs whole batches on cores // streams
# intra-op threads. The registry's `cpu_streams` overrides it per model.
CPU_STREAMS = 2


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; empty where there is none."""
    name, flags = "", frozenset[str]()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if not name and line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif not flags and line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def cpu_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model_name() -> str:
    """The CPU's model name ("unknown CPU" where /proc/cpuinfo has none): benchmarks name their machine."""
    return _cpuinfo()[0] or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (amx_bf16, avx512_bf16, ...)."""
    return _cpuinfo()[1]


def cpu_kind() -> str:
    """"amx" on CPUs with AMX-BF16 tiles, "other" elsewhere (the rows of core.budgets' measured CPU budgets)."""
    return "amx" if "amx_bf16" in cpu_flags() else "other"


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matmuls: AMX or AVX512-BF16 (bf16 elsewhere is emulated, slower than float32)."""
    return not cpu_flags().isdisjoint({"amx_bf16", "avx512_bf16"})


def cpu_stream_split(wanted: int = CPU_STREAMS) -> tuple[int, int]:
    """(streams, intra-op threads per stream) for `wanted` CPU inference streams on this process's cores."""
    cores = cpu_cores()
    streams = max(1, min(wanted, cores))
    return streams, max(1, cores // streams)


def cuda_device_name() -> str | None:
    """The first CUDA device's name, None without one (or with a broken CUDA install)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU" to the planner
        return None
    return None
