"""The warm-up: one batch at the full token budget on the path production takes, at load.

Mixed lengths, not equal ones: with every row the same length transformers drops the attention mask, and
the kernels measured are not those a real (padded) batch uses; a masked SDPA can hold batch x heads x
length^2 elements. The batch is the worst padding the batcher allows: the widest pair the model accepts,
as many rows as the token budget holds at that width, the other rows spread down to 2 tokens (~50%
padding). A budget that holds only one pair at that width adds a second, two-row batch at half the width,
so the masked path is measured too.

It runs in an inference thread, on the scheduler's CUDA stream, under the device gate (engine.device), so
the peak is this model's own and includes the thread's cuBLAS workspace.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from backends.base import Backend
from engine.device import DeviceTimer, PeakMeter


class BudgetDoesNotHold(RuntimeError):
    """The token budget cannot run on this device: the warm-up batch ran out of memory."""


def mixed_lengths(n: int, width: int) -> list[int]:
    """n lengths: one of `width`, the rest spread evenly down to 2."""
    if n == 1:
        return [width]
    low = min(2, width)
    return [width - (width - low) * k // (n - 1) for k in range(n)]


def warmup_shapes(
    length: int, *, budget: int, max_batch_size: int, packed: bool = False, width_of: Callable[[int], int] = int
) -> list[list[int]]:
    """`packed`: the backend packs batches without padding (Backend.is_padded False), so the batch builder
    fills the budget with real tokens (engine.batching); the mixed batch has only about half, and a batch
    of real tokens at the full budget is run as well. `width_of`: how wide the backend pads a batch whose
    longest pair has that many tokens (Backend.padded_width; an exported runtime rounds it up), so the
    shapes cost what the batch builder lets a batch cost, not more."""
    width = max(2, min(length, budget))
    n = max(1, min(max_batch_size, budget // width_of(width)))
    shapes = [mixed_lengths(n, width)]
    if n == 1 and max_batch_size >= 2 and width >= 4:
        # The widest two-row batch under the budget (half the width, less where the runtime rounds it up).
        half = width // 2
        while half > 2 and 2 * width_of(half) > budget:
            half -= 1
        shapes.append(mixed_lengths(2, half))
    if packed and n > 1:
        shapes.append([width] * n)
    return shapes


def run_warmup(backend: Backend, forward_rows: Any, shapes: list[list[int]], *, budget: int, workspace_bytes: int) -> dict[str, Any]:
    """Forward each shape once and measure. `workspace_bytes`: what an earlier warm-up found the thread keeps
    (already inside the baseline now, so added back)."""
    meter = PeakMeter(backend.device)
    seconds: list[float] = []
    with meter.measure():
        for lengths in shapes:
            rows = backend.synthetic_rows(lengths)
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    scores = forward_rows(rows)
                    if backend.device.type == "cuda":
                        torch.cuda.current_stream().synchronize()
            except torch.OutOfMemoryError:
                oom = True
            else:
                oom = False
                del scores
            if oom:
                raise BudgetDoesNotHold(
                    f"model {backend.name}: the warm-up batch of {len(lengths)} pairs x {max(lengths)} tokens "
                    f"(max_batch_tokens {budget}) ran out of memory on {backend.device}; lower max_batch_tokens "
                    f"or max_length"
                )
            seconds.append(time.perf_counter() - start)
    main = shapes[0]
    out: dict[str, Any] = {
        "pairs": len(main),
        "length": max(main),
        "seconds": seconds[0],
        "padded_tokens": len(main) * max(main),
        "real_tokens": sum(main),
        "shapes": [[len(s), max(s)] for s in shapes],
        "memory_measured": meter.measured,
    }
    if meter.measured:
        first_workspace = max(meter.after - meter.base, 0) if not workspace_bytes else 0
        out["workspace_bytes"] = workspace_bytes or first_workspace
        out["peak_bytes"] = meter.peak
        out["activation_bytes"] = meter.peak - meter.base + workspace_bytes
    else:
        out["workspace_bytes"] = 0
        out["peak_bytes"] = 0
        out["activation_bytes"] = 0
        out["memory_note"] = "not measured: a CPU has no allocator counter to read"
    return out


# -- the throughput ladder (GPU budgets at the knee, pool.local_loading) -----------------------------------------
# Pairs of about this many tokens make a typical batch (a query and a passage of ~80 words).
RATE_PAIR_TOKENS = 128
RATE_REPEATS = 3


def rate_shape(budget: int, length: int) -> list[int]:
    """A full batch of typical pairs at this budget: two lengths a token apart (the attention mask is used)."""
    width = max(2, min(length, RATE_PAIR_TOKENS))
    return [width - (k % 2) for k in range(max(1, budget // width))]


def run_rate(backend: Backend, forward_rows: Any, lengths: list[int], repeats: int = RATE_REPEATS) -> dict[str, Any]:
    """Real tokens per second of device time for one batch of these lengths (median of `repeats` after one
    untimed run), and this model's peak memory over the runs."""
    rows = backend.synthetic_rows(lengths)
    meter = PeakMeter(backend.device)
    seconds: list[float] = []
    with meter.measure(), torch.inference_mode():
        for k in range(repeats + 1):
            timer = DeviceTimer(backend.device)
            forward_rows(rows, timer=timer)  # started once the batch is collated: the device's time, not the host's
            timer.stop()
            timer.synchronize()
            if k:
                seconds.append(timer.seconds())
    median = sorted(seconds)[len(seconds) // 2]
    return {
        "tokens": sum(lengths), "pairs": len(lengths), "tokens_per_s": sum(lengths) / max(median, 1e-9),
        "seconds": median, "peak_bytes": meter.peak, "activation_bytes": max(meter.peak - meter.base, 0),
    }
