"""Facts about the machine this process runs on: its cores, its CPU's model and kind, how the cores split
among CPU inference streams, the CPU priorities of the threads that share them, and the CUDA device's name.
Read here once; budgets, backends, the engine, the runtimes and the benchmarks all ask this module.

No torch at import: the CUDA name imports it only when asked (the planner runs without a model loaded).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger("rerank_gateway.host")

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
    """The cores this process may use: those it may run on (its affinity, not the machine's count), capped
    by its cgroup's CPU quota rounded down (at least one). A Kubernetes pod limited to 2 CPUs on a 32-core
    node has all 32 in its affinity; sizing threads by them would run 32 intra-op threads in a quota of 2,
    and the kernel throttles the pod for most of each period."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota_cores()
    return max(1, min(cores, int(quota))) if quota is not None else cores


def cpu_quota_cores(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroups in cores (a container's CPU limit: cgroup v2's cpu.max, v1's
    cpu.cfs_quota_us over cpu.cfs_period_us), the smallest along the path up to the root; None where none
    is set or the files cannot be read. Inside a container the cgroup path names the host's hierarchy, which
    is not mounted there: the mount's own root is the container's cgroup, and is read too."""
    try:
        with open(proc_cgroup, encoding="ascii", errors="ignore") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            for folder in _cgroup_folders(root, path):
                fields = _read(os.path.join(folder, "cpu.max")).split()
                if len(fields) == 2 and fields[0] != "max":
                    quotas.append(int(fields[0]) / int(fields[1]))
        elif "cpu" in controllers.split(","):  # v1: mounted as cpu,cpuacct (or cpu)
            mount = next((m for m in (os.path.join(root, controllers), os.path.join(root, "cpu")) if os.path.isdir(m)), None)
            for folder in _cgroup_folders(mount, path) if mount else ():
                quota, period = _read(os.path.join(folder, "cpu.cfs_quota_us")), _read(os.path.join(folder, "cpu.cfs_period_us"))
                if quota.lstrip("-").isdigit() and int(quota) > 0 and period.isdigit() and int(period) > 0:
                    quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def _cgroup_folders(mount: str, path: str) -> list[str]:
    """mount/path and each folder above it, up to the mount itself."""
    folders, parts = [], [p for p in path.split("/") if p]
    for k in range(len(parts), -1, -1):
        folder = os.path.join(mount, *parts[:k])
        if os.path.isdir(folder):
            folders.append(folder)
    return folders


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return ""


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


# Nice value of CPU inference threads (0 = the process's own): the event loop and the tokenizer lane of small
# requests, which need little CPU but need it at once, are not queued behind batches. With the fairness
# test's tiny BERT, a 3-document search beside bulk batches of its tenant: p99 19-28 ms at 10 against
# 23-28 ms at 0 (docs/tenancy.md, fair scheduling). Bulk tokenization runs below them.
CPU_STREAM_NICE = 10
# Nice value of the bulk tokenizer lane's threads (engine.lanes): the lowest priority there is.
BULK_TOKENIZE_NICE = 19


def lower_cpu_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread, and threads it starts inherit
    it). Never fails its thread."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError as exc:
        log.debug("could not lower a thread's priority to nice %d: %s", nice, exc)


def at_cpu_priority(nice: int, fn: Callable[[], T]) -> T:
    """fn() on a thread of its own at `nice`, so that the threads it starts (a runtime's worker pool)
    inherit that priority rather than the caller's; its result, or its exception."""
    out: dict[str, object] = {}

    def run() -> None:
        lower_cpu_priority(nice)
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            out["error"] = exc

    thread = threading.Thread(target=run, name="at-cpu-priority", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]


def cuda_device_name() -> str | None:
    """The first CUDA device's name, None without one (or with a broken CUDA install)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU" to the planner
        return None
    return None
