"""`rerank-gateway tune MODEL`: measure pairs/s and peak memory across token budgets on this machine, and
print the registry profile to paste.

Capacity planning should rest on measurements of the machine that serves, not arithmetic. For each
budget the model runs the same mixed-length workload (lognormal pair lengths, seeded) through the real
engine (`Scheduler`, its CPU streams, its batch building), best of a few rounds, timed in wall-clock and in
this process's CPU seconds (on a CPU the profile is chosen by pairs per CPU-second, which the neighbours'
load on a shared machine moves far less than wall-clock rates); then one batch at the full
budget with mixed lengths is measured for peak memory: `torch.cuda.max_memory_allocated` on a GPU, and
on a CPU (whose allocator keeps no statistics) the peak of live bytes from torch.profiler's allocation
events (`peak_live_bytes`). The profile picks the smallest budget within 3% of the fastest: within noise,
a smaller batch pads less and waits less, and carries that budget's measured throughput
(`measured_tokens_per_s`, `measured_pairs_per_s`, on a CPU `measured_cpu_cores`): what
`rerank-gateway plan --rps` sizes pools from.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import yaml

from core.budgets import KNEE_TOLERANCE, batch_pairs, gpu_probe_tokens, knee
from core.config import Effective, LocalModelSpec, Registry, effective, gpu_models
from core.host import cpu_cores, cpu_model_name

GIB = 1024**3
KIB = 1024
DEFAULT_BUDGETS = (512, 1024, 2048, 4096, 8192, 16384)
# Budgets within this fraction of the fastest count as equally fast.
TIE = 0.03
SEED = 7


@dataclass
class Point:
    max_batch_tokens: int
    pairs_per_s: float
    # Pairs per second of this process's CPU time: on a CPU shared with other work, wall-clock rates move
    # with the neighbours' load, CPU time far less (streams run one intra-op thread each: no spinning).
    pairs_per_cpu_s: float
    tokens_per_s: float
    peak_activation_bytes: int

    @property
    def kb_per_token(self) -> float:
        return self.peak_activation_bytes / self.max_batch_tokens / KIB


@dataclass
class TuneResult:
    model_id: str
    profile_key: str  # "cpu" or the GPU type
    device: str
    dtype: str
    weights_bytes: int
    points: list[Point]
    pairs: int
    machine: str
    cpu_cores: int | None = None  # the cores a CPU run had (its affinity); None on a GPU
    # On a GPU, the ladder a plain registry entry's automatic budget is chosen from at load (pool.local_loading):
    # each rung's max_batch_tokens, tokens_per_s, peak_bytes; the knee is what such an entry runs with.
    ladder: list[dict] | None = None
    ladder_cap: int | None = None  # the largest budget the ladder's memory model allowed
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d"))

    def rate(self, p: Point) -> float:
        """What "fastest" means: pairs per CPU-second on a CPU, pairs per second on a GPU."""
        return p.pairs_per_cpu_s if self.device == "cpu" else p.pairs_per_s

    @property
    def best(self) -> Point:
        fastest = max(self.rate(p) for p in self.points)
        return min((p for p in self.points if self.rate(p) >= (1 - TIE) * fastest), key=lambda p: p.max_batch_tokens)


def peak_live_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak live bytes allocated through torch's CPU allocator while fn runs, fn's result).

    torch's CPU allocator keeps no statistics and tracemalloc cannot see it; with profile_memory the
    profiler records every allocation and free (kernels' own temporaries included) with its size, so the
    running sum in time order is the live bytes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, result


def pair_lengths(n: int, max_length: int, seed: int = SEED) -> list[int]:
    """Pair lengths in tokens: lognormal around 110 (a query and a passage of ~80 words), clipped."""
    rng = random.Random(seed)
    return [max(8, min(max_length, int(rng.lognormvariate(math.log(110), 0.75)))) for _ in range(n)]


def mixed_batch(budget: int, width: int) -> list[int]:
    """A batch of `budget` padded tokens at `width`: rows from the full width down to half of it."""
    n = max(1, budget // width)
    return [width] if n == 1 else [width - (width // 2) * k // (n - 1) for k in range(n)]


def _prepared(backend, lengths: list[int]):
    from backends.base import Prepared

    rows = backend.synthetic_rows(lengths)
    return Prepared(ids=rows.ids, lengths=rows.lengths, doc_index=np.arange(len(lengths), dtype=np.int32), n_docs=len(lengths),
                    types=rows.types, context=rows.contexts[0] if lengths else None, tokens=sum(lengths))


def _throughput(scheduler, backend, lengths: list[int], clients: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for `clients` concurrent requests sharing the pairs."""
    requests = [_prepared(backend, lengths[k::clients]) for k in range(clients)]

    async def go() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(scheduler.submit(p, top_n=1) for p in requests if p.n_items))
        return time.perf_counter() - start, time.process_time() - cpu

    return asyncio.run(go())


def _peak(backend, budget: int, width: int) -> int:
    import torch

    rows = backend.synthetic_rows(mixed_batch(budget, width))

    def forward():
        with torch.inference_mode():
            return backend.forward(backend.collate(rows))

    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
        torch.cuda.reset_peak_memory_stats(backend.device)
        base = torch.cuda.memory_allocated(backend.device)
        forward()
        torch.cuda.synchronize(backend.device)
        return torch.cuda.max_memory_allocated(backend.device) - base
    return peak_live_bytes(forward)[0]


def tune(
    registry: Registry, model_id: str, gpu_type: str, *, budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    pairs: int = 400, rounds: int = 2, clients: int = 4, log: Callable[[str], None] = lambda _: None,
) -> TuneResult:
    from backends import backend_class
    from engine import Scheduler

    spec = registry.models[model_id]
    if not isinstance(spec, LocalModelSpec):
        raise ValueError(f"model {model_id!r} is answered by a remote upstream: there is nothing to tune here")
    eff = effective(spec, gpu_type)
    backend = backend_class(spec.backend)(model_id, spec, eff)
    backend.load()
    lengths = pair_lengths(pairs, eff.max_length)
    width = min(eff.max_length, max(lengths))
    points: list[Point] = []
    for budget in budgets:
        if budget < width:
            log(f"skip {budget}: below the workload's widest pair ({width} tokens)")
            continue
        scheduler = Scheduler(
            backend, max_batch_tokens=budget, max_batch_size=eff.max_batch_size if eff.max_batch_size_set else batch_pairs(budget, eff.device),
            max_queue_pairs=10**9,
            max_queue_tokens=10**12, cpu_streams=spec.cpu_streams,
        )
        try:
            scheduler.warmup(eff.max_length)
            runs = [_throughput(scheduler, backend, lengths, clients) for _ in range(rounds)]
        finally:
            scheduler.close()
        seconds, cpu_seconds = min(r[0] for r in runs), min(r[1] for r in runs)
        peak = _peak(backend, budget, width)
        points.append(Point(budget, len(lengths) / seconds, len(lengths) / cpu_seconds, sum(lengths) / seconds, peak))
        log(f"{budget:>6} tokens: {points[-1].pairs_per_s:8.1f} pairs/s, {points[-1].pairs_per_cpu_s:8.1f} pairs/CPU-s, "
            f"peak activations {peak / GIB:.3f} GiB")
    if not points:
        raise ValueError(f"no budget in {list(budgets)} holds a pair of {width} tokens")
    ladder, ladder_cap = None, None
    if eff.device == "cuda":
        ladder_cap, ladder = _load_time_ladder(registry, gpu_type, spec, eff, backend)
        for rung in ladder:
            log(f"ladder {rung['max_batch_tokens']:>6} tokens: {rung['tokens_per_s']} tokens/s, peak {rung['peak_bytes'] / GIB:.3f} GiB")
    return TuneResult(
        model_id=model_id, profile_key=eff.profile if eff.profile != "default" else ("cpu" if eff.device == "cpu" else gpu_type),
        device=eff.device, dtype=str(backend.dtype).removeprefix("torch."), weights_bytes=backend.weights_bytes(),
        points=points, pairs=len(lengths), machine=_machine(eff.device),
        cpu_cores=cpu_cores() if eff.device == "cpu" else None, ladder=ladder, ladder_cap=ladder_cap,
    )


def _load_time_ladder(registry: Registry, gpu_type: str, spec: LocalModelSpec, eff: Effective, backend) -> tuple[int, list[dict]]:
    """(the memory cap, the ladder) a plain entry of this model measures at load on this GPU: the same probe
    warm-up, memory budget and ladder as pool.local_loading, so the knee printed is the one it would run."""
    from engine import Scheduler
    from pool.local_loading import budget_bytes, measure_budget_ladder

    probe = Scheduler(backend, max_batch_tokens=gpu_probe_tokens(eff.max_length), max_batch_size=eff.max_batch_size,
                      max_queue_pairs=1, max_queue_tokens=1, cpu_streams=spec.cpu_streams)
    try:
        warmup = probe.warmup(eff.max_length)
    except BaseException:
        probe.close()
        raise
    cap, _, ladder = measure_budget_ladder(probe, warmup, backend.weights_bytes(), budget_bytes(eff, gpu_models(registry, gpu_type)), eff)
    return cap, ladder


def _machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{cpu_model_name()}, {cpu_cores()} cores"


def profile_yaml(result: TuneResult) -> str:
    """The registry fragment to paste: the model's profile for this machine, with the chosen budget's
    measured throughput for `plan --rps`, and every budget's measurements as comments."""
    best = result.best
    profile: dict[str, Any] = {"max_batch_tokens": best.max_batch_tokens}
    if result.device == "cuda":
        # What the chosen batch needs beside the weights, with the margin the auto budget keeps.
        need = (result.weights_bytes + best.peak_activation_bytes) / GIB / 0.9
        profile["memory_budget_gb"] = math.ceil(need * 4) / 4
    # Wall-clock rates of one worker as configured (its cpu_streams), real (unpadded) tokens.
    profile["measured_tokens_per_s"] = round(best.tokens_per_s)
    profile["measured_pairs_per_s"] = round(best.pairs_per_s, 1)
    if result.device == "cpu":
        profile["measured_cpu_cores"] = result.cpu_cores or cpu_cores()
    fragment: dict[str, Any] = {"models": {result.model_id: {"profiles": {result.profile_key: profile}}}}
    if result.device == "cuda":
        fragment["models"][result.model_id]["weights_gb"] = round(result.weights_bytes / GIB, 3)
        fragment["models"][result.model_id]["activation_kb_per_token"] = round(max(p.kb_per_token for p in result.points), 1)
    lines = [
        f"# rerank-gateway tune {result.model_id}, {result.date}: {result.machine}, {result.device} {result.dtype}, "
        f"{result.pairs} mixed-length pairs per round",
        "# max_batch_tokens: pairs/s (wall), pairs per CPU-second, peak activation KiB/token; "
        + ("chosen by pairs per CPU-second" if result.device == "cpu" else "chosen by pairs/s"),
        *(
            f"#   {p.max_batch_tokens:>6}: {p.pairs_per_s:8.1f} pairs/s, {p.pairs_per_cpu_s:8.1f} pairs/CPU-s, "
            f"{p.kb_per_token:6.1f} KiB/token"
            + ("   <- chosen (smallest within 3% of the fastest)" if p is best else "")
            for p in result.points
        ),
        *_ladder_lines(result.ladder, result.ladder_cap),
        f"# weights {result.weights_bytes / GIB:.3f} GiB on {result.device}",
        f"# measured_*: the chosen budget's wall-clock throughput on {result.machine}, {result.date} "
        "(a machine shared with other work measures low); `plan --rps` sizes pools from them",
        yaml.safe_dump(fragment, sort_keys=False, default_flow_style=False).rstrip(),
    ]
    return "\n".join(lines) + "\n"


def _ladder_lines(ladder: list[dict] | None, cap: int | None) -> list[str]:
    """The load-time ladder (GPU): what a plain entry with no profile measures and chooses at load."""
    if not ladder:
        return []
    chosen = knee([(r["max_batch_tokens"], r["tokens_per_s"]) for r in ladder])
    return [
        f"# load-time ladder (a plain entry's automatic budget: the smallest within {KNEE_TOLERANCE:.0%} of the fastest; "
        f"memory allows up to {cap} tokens):",
        *(
            f"#   {r['max_batch_tokens']:>6}: {r['tokens_per_s']:>9} tokens/s, peak {r['peak_bytes'] / GIB:6.2f} GiB"
            + ("   <- knee" if r["max_batch_tokens"] == chosen else "")
            for r in ladder
        ),
    ]
