"""a. The card's ceilings in this run (METHOD.md): a large matmul's TFLOP/s in bf16 and fp16 and a
device-to-device copy's GB/s (bytes read + written), on random data, timed with CUDA events after a
warm-up, median of many. Later sections quote "of peak" against these, never a datasheet."""

from __future__ import annotations

import statistics
import time

import torch

from bench.gpu_check.plan import Plan
from bench.gpu_check.record import Recorder


def _timed(fn, repeats: int, cuda: bool) -> list[float]:
    seconds = []
    for _ in range(repeats):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            seconds.append(start.elapsed_time(stop) / 1000)
        else:
            t = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t)
    return seconds


def matmul(n: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    cuda = device == "cuda"
    # Three input sets, rotated: each product reads operands not left in the cache by the previous one.
    sets = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)) for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    k = [0]

    def one():
        a, b = sets[k[0] % 3]
        k[0] += 1
        torch.matmul(a, b, out=out)

    _timed(one, 5, cuda)
    seconds = _timed(one, repeats, cuda)
    assert torch.isfinite(out).all(), "matmul produced non-finite values"
    med = statistics.median(seconds)
    return {"n": n, "median_s": med, "min_s": min(seconds), "tflops": 2 * n**3 / med / 1e12, "tflops_best": 2 * n**3 / min(seconds) / 1e12, "repeats": repeats}


def copy(nbytes: int, device: str, repeats: int) -> dict:
    cuda = device == "cuda"
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    _timed(lambda: dst.copy_(src), 3, cuda)
    seconds = _timed(lambda: dst.copy_(src), repeats, cuda)
    assert torch.equal(dst, src)
    med = statistics.median(seconds)
    moved = 2 * src.numel() * src.element_size()  # read + write
    return {"bytes": moved // 2, "median_s": med, "gb_per_s": moved / med / 1e9, "gb_per_s_best": moved / min(seconds) / 1e9, "repeats": repeats}


def run(rec: Recorder, plan: Plan, ctx: dict) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU", "torch": torch.__version__}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    rec.put("device", info)
    n = 512 if plan.smoke else 8192
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with rec.step(f"matmul_{name}"):
            rec.put(f"matmul_{name}", matmul(n, dtype, device, repeats=5 if plan.smoke else 30))
    with rec.step("copy"):
        rec.put("copy", copy(2**24 if plan.smoke else 2 * 2**30, device, repeats=5 if plan.smoke else 30))
