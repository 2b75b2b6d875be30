"""Loading a local model: its backend and weights, its engine Scheduler, the warm-up that proves the token
budget on the path production takes, and, on a GPU with no profile, that budget chosen at the knee of a
measured ladder (capped by what the warm-up says fits in memory).

Runs in a worker thread (the pool loads off the event loop) and touches no pool state: it returns the
model's LocalRunner, or raises with the reason the model is unavailable.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from backends import backend_class
from backends.base import Backend
from core.budgets import KNEE_TOLERANCE, batch_pairs, gpu_budget, knee, ladder_rungs, usable_gb
from core.config import Effective, LocalModelSpec, ServerSettings
from engine import Scheduler
from engine.warmup import BudgetDoesNotHold
from observability.metrics import Metrics
from pool.local_runner import LocalRunner

log = logging.getLogger("rerank_gateway")

GB = 1024**3


class BudgetError(RuntimeError):
    pass


def load_local(
    model_id: str, spec: LocalModelSpec, eff: Effective, *, server: ServerSettings, metrics: Metrics, cuda_models: int
) -> LocalRunner:
    """The loaded, warmed-up model. `cuda_models`: how many models this registry may load on the GPU (a
    profile-less model's memory budget is an even share of the card among them)."""
    start = time.perf_counter()
    backend = backend_class(spec.backend)(model_id, spec, eff)
    if backend.device.type == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the profile needs a CUDA GPU and none is available")
    backend.load()
    weights_bytes = backend.weights_bytes()
    scheduler = _scheduler(backend, spec, eff, server, metrics, eff.max_batch_tokens)
    budget_reason, ladder = None, None
    try:
        warmup = scheduler.warmup(eff.max_length)
        if eff.auto_budget:
            scheduler, warmup, budget_reason, ladder = _size_budget(
                backend, spec, eff, server, metrics, scheduler, warmup, weights_bytes, budget_bytes(eff, cuda_models)
            )
        _check_budget(model_id, eff, weights_bytes, warmup, scheduler.max_batch_tokens)
    except BaseException:
        scheduler.close()
        raise
    # What is loaded now lives as long as the process: leave it out of every later full garbage
    # collection, which otherwise walks these objects again and stalls all threads for 100s of ms.
    gc.collect()
    gc.freeze()
    load_seconds = time.perf_counter() - start
    log.info(
        "model %s ready in %.1f s (%s, %s, %.2f GB weights)", model_id, load_seconds, backend.device, backend.dtype, weights_bytes / GB
    )
    return LocalRunner(
        model_id, spec, eff, scheduler, metrics, server=server,
        weights_bytes=weights_bytes, warmup=warmup, budget_reason=budget_reason, budget_ladder=ladder, load_seconds=load_seconds,
    )


def _scheduler(
    backend: Backend, spec: LocalModelSpec, eff: Effective, server: ServerSettings, metrics: Metrics, max_batch_tokens: int,
    max_batch_size: int | None = None,
) -> Scheduler:
    return Scheduler(
        backend,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size or eff.max_batch_size,
        max_queue_pairs=server.max_queue_pairs,
        max_queue_tokens=server.max_queue_tokens,
        metrics=metrics,
        cpu_streams=spec.cpu_streams,
    )


def _size_budget(
    backend: Backend, spec: LocalModelSpec, eff: Effective, server: ServerSettings, metrics: Metrics,
    probe: Scheduler, warmup: dict[str, Any], weights_bytes: int, budget_bytes: float,
) -> tuple[Scheduler, dict[str, Any], str, list[dict[str, Any]]]:
    """A GPU model with no profile: the memory the probe warm-up measured caps the budget; a ladder of
    budgets under that cap is measured for real tokens/s, and the knee (core.budgets.knee) is taken and
    proven with a warm-up at its size (a scheduler of its own; the probe's is closed). The allocator's cache
    of the bigger rungs is given back, so the process holds weights + one batch at the knee. Returns the
    scheduler, its warm-up, why, and the ladder."""
    import torch

    cap, memory_why, ladder = measure_budget_ladder(probe, warmup, weights_bytes, budget_bytes, eff)
    chosen = knee([(r["max_batch_tokens"], r["tokens_per_s"]) for r in ladder])
    fastest = max(ladder, key=lambda r: r["tokens_per_s"])
    # The knee is proven at full width, the worst padding the batcher allows; should that run out of memory
    # (the memory model was optimistic), the rungs below it are tried in turn.
    tries = [chosen, *sorted((r["max_batch_tokens"] for r in ladder if r["max_batch_tokens"] < chosen), reverse=True)]
    for tokens in tries:
        # Pairs per batch follow the chosen budget, unless the registry set them.
        pairs = eff.max_batch_size if eff.max_batch_size_set else batch_pairs(tokens, eff.device)
        scheduler = _scheduler(backend, spec, eff, server, metrics, tokens, max_batch_size=pairs)
        try:
            warmup = scheduler.warmup(eff.max_length)
            break
        except BudgetDoesNotHold as exc:
            scheduler.close()
            if tokens == tries[-1]:
                raise
            log.warning("model %s: %s; trying the ladder's next budget down", backend.name, exc)
        except BaseException:
            scheduler.close()
            raise
        finally:
            torch.cuda.empty_cache()
    knee_is = (
        f"the smallest budget of the measured ladder within {KNEE_TOLERANCE:.0%} of the fastest "
        f"({fastest['tokens_per_s']} tokens/s at {fastest['max_batch_tokens']})"
    )
    if tokens != chosen:
        knee_is = f"a rung below {chosen}, {knee_is}, whose warm-up at full width ran out of memory"
    why = f"auto (no profile for this GPU): {tokens} tokens, {knee_is}; memory allows up to {cap} ({memory_why})"
    return scheduler, warmup, why, ladder


def measure_budget_ladder(
    probe: Scheduler, warmup: dict[str, Any], weights_bytes: int, budget_bytes: float, eff: Effective,
) -> tuple[int, str, list[dict[str, Any]]]:
    """(the memory cap, why, the ladder measured under it) for a profile-less GPU model, from the probe
    scheduler and its warm-up; closes the probe and gives the allocator's cache back. What the load chooses
    from, and what `rerank-gateway tune` prints: one function, so the two agree."""
    import torch

    # The inference thread's cuBLAS workspace (engine.warmup) is a fixed cost beside the weights, not
    # bytes per token: left out of the per-token rate.
    workspace = int(warmup.get("workspace_bytes", 0))
    cap, memory_why = gpu_budget(
        weights_bytes=weights_bytes + workspace, activation_bytes=int(warmup["activation_bytes"]) - workspace,
        # The probe's batch as run (rows x width), not its budget: a max_length that does not divide the
        # budget leaves part of it unused, and per-token memory over the budget would read low.
        probe_tokens=int(warmup["padded_tokens"]), budget_bytes=budget_bytes, max_length=eff.max_length,
    )
    # A registry's max_batch_size bounds every batch the model will run, the ladder's included; unset, a
    # rung's pairs follow its budget (core.budgets.batch_pairs), as the chosen budget's will.
    max_pairs = eff.max_batch_size if eff.max_batch_size_set else None
    try:
        ladder = probe.measure_ladder(ladder_rungs(eff.max_length, cap), eff.max_length, max_pairs=max_pairs)
    finally:
        probe.close()
        torch.cuda.empty_cache()
    if not ladder:
        raise BudgetError(f"no budget of the ladder ran ({memory_why})")
    return cap, memory_why, ladder


def budget_bytes(eff: Effective, cuda_models: int) -> float:
    """A GPU model's memory budget in bytes: its memory_budget_gb, else an even share of the card's usable
    memory among the models this registry may load on it (core.config.gpu_models)."""
    if eff.memory_budget_gb is not None:
        return eff.memory_budget_gb * GB
    import torch

    card_gb = torch.cuda.get_device_properties(0).total_memory / GB
    return usable_gb(card_gb) / max(1, cuda_models) * GB


def _check_budget(model_id: str, eff: Effective, weights_bytes: int, warmup: dict[str, Any], batch_tokens: int) -> None:
    budget = eff.memory_budget_gb
    if budget is None or eff.device != "cuda":
        return
    need = weights_bytes + warmup["activation_bytes"]
    if need > budget * GB:
        raise BudgetError(
            f"model {model_id}: weights {weights_bytes / GB:.2f} GB + one batch of "
            f"{batch_tokens} tokens ({warmup['pairs']} pairs x {warmup['length']}, "
            f"mixed lengths; the inference thread's workspace included) {warmup['activation_bytes'] / GB:.2f} GB = "
            f"{need / GB:.2f} GB exceeds its memory_budget_gb {budget:g} (profile {eff.profile}); "
            f"lower max_batch_tokens or raise the budget"
        )
