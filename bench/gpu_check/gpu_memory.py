"""A process's GPU memory as the driver sees it (what nvidia-smi shows), by pid: nvidia-smi's
--query-compute-apps, else NVML (nvidia-ml-py). The device's total use is recorded beside it, since a
sandbox may hide pids."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any


def _smi(query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def _nvml() -> tuple[list[tuple[int, float]], float]:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        procs = [(p.pid, (p.usedGpuMemory or 0) / 2**20) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        return procs, used
    finally:
        pynvml.nvmlShutdown()


def snapshot(pid: int | None) -> dict[str, Any]:
    """{"process_mib": that pid's MiB or None, "device_used_mib", "processes": [[pid, MiB]...], "source"}."""
    out: dict[str, Any] = {"pid": pid}
    if shutil.which("nvidia-smi"):
        try:
            procs = [(int(p), float(m)) for p, m in _smi("--query-compute-apps=pid,used_memory")]
            out["device_used_mib"] = float(_smi("--query-gpu=memory.used")[0][0])
            out["source"] = "nvidia-smi"
        except (subprocess.SubprocessError, ValueError, IndexError) as exc:
            out["nvidia_smi_error"] = str(exc)[:200]
            procs = None
    else:
        procs = None
    if procs is None:
        try:
            procs, out["device_used_mib"] = _nvml()
            out["source"] = "nvml"
        except Exception as exc:  # noqa: BLE001 - no GPU, no driver, no pynvml: say so
            out["source"] = f"none ({type(exc).__name__})"
            return out
    out["processes"] = procs
    mine = [m for p, m in procs if p == pid]
    out["process_mib"] = mine[0] if mine else None
    return out


def describe(snap: Any) -> str:
    """"4.21 GiB" for the process; "4.50 GiB (device)" when only the device's total is known; "-" without a GPU
    (or in a report whose JSON holds anything else there: the report reads it defensively)."""
    if not isinstance(snap, dict):
        return "-"
    if snap.get("process_mib") is not None:
        return f"{snap['process_mib'] / 1024:.2f} GiB"
    if snap.get("device_used_mib") is not None:
        return f"{snap['device_used_mib'] / 1024:.2f} GiB (device)"
    return "-"
