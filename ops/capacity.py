"""Capacity planning from measured profiles: how many workers of each GPU type (or CPU cores) a model needs
for a traffic shape. `rerank-gateway plan --rps R --docs N --doc-tokens T` prints it.

The inputs are the throughput figures `rerank-gateway tune` measures and writes into a profile
(`measured_tokens_per_s`, `measured_pairs_per_s`, and `measured_cpu_cores` for the cpu profile). A profile
without them is listed as unmeasured: nothing here is computed from paper FLOP/s.

The model, stated in every answer:
- a pair is the query plus one document plus a few special tokens, truncated at the profile's max_length;
- a worker's throughput in tokens/s holds across pair lengths (linear cost; attention's quadratic term is
  small at reranker lengths); with only pairs/s measured, the measured pair length is assumed;
- workers run at most `target_utilization` of their measured throughput, which leaves queueing headroom;
- one more worker than the load needs keeps the pool whole through a rolling restart or a lost node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import LocalModelSpec, Profile, Registry, effective

# [CLS] query [SEP] document [SEP] and the like; the Qwen3 prompt template adds more, which its
# measured tokens/s already counts.
SPECIAL_TOKENS = 4


@dataclass(frozen=True)
class Demand:
    rps: float
    docs: int
    doc_tokens: int
    query_tokens: int = 32
    target_utilization: float = 0.7

    @property
    def pairs_per_s(self) -> float:
        return self.rps * self.docs


@dataclass(frozen=True)
class PoolSize:
    model_id: str
    profile: str  # a gpu_types key or "cpu"
    max_length: int
    pair_tokens: int
    basis: str  # which measurement the answer rests on
    pairs_per_s_per_worker: float | None  # at this pair length
    workers: int | None  # None: the profile is not measured
    cpu_cores: int | None = None
    request_seconds: float | None = None  # one request alone on an idle worker: the latency floor

    @property
    def measured(self) -> bool:
        return self.workers is not None


def worker_pairs_per_s(profile: Profile, pair_tokens: int) -> tuple[float | None, str]:
    """One worker's pairs/s at this pair length, and the basis of the figure."""
    if profile.measured_tokens_per_s:
        basis = f"measured {profile.measured_tokens_per_s:g} tokens/s"
        if profile.measured_pairs_per_s:
            basis += f" (at {profile.measured_tokens_per_s / profile.measured_pairs_per_s:.0f} tokens/pair)"
        return profile.measured_tokens_per_s / pair_tokens, basis
    if profile.measured_pairs_per_s:
        return profile.measured_pairs_per_s, f"measured {profile.measured_pairs_per_s:g} pairs/s (pair length assumed as measured)"
    return None, "not measured: run `rerank-gateway tune` on this hardware"


def size_pool(registry: Registry, model_id: str, profile_key: str, demand: Demand) -> PoolSize:
    spec = registry.models[model_id]
    assert isinstance(spec, LocalModelSpec), "plan_capacity sizes local models only"
    eff = effective(spec, profile_key)
    pair_tokens = min(demand.query_tokens + demand.doc_tokens + SPECIAL_TOKENS, eff.max_length)
    profile = spec.profiles.get(profile_key, Profile())
    per_worker, basis = worker_pairs_per_s(profile, pair_tokens)
    if per_worker is None:
        return PoolSize(model_id, profile_key, eff.max_length, pair_tokens, basis, None, None)
    workers = max(1, math.ceil(demand.pairs_per_s / (per_worker * demand.target_utilization)))
    cores = None
    if profile_key == "cpu":
        if profile.measured_cpu_cores:
            cores = workers * profile.measured_cpu_cores
            basis += f" on {profile.measured_cpu_cores} cores per worker"
        else:
            basis += "; cores per worker unknown (measured_cpu_cores unset)"
    return PoolSize(
        model_id, profile_key, eff.max_length, pair_tokens, basis, per_worker, workers, cores,
        request_seconds=demand.docs / per_worker,
    )


def plan_capacity(registry: Registry, demand: Demand, models: list[str] | None = None) -> list[PoolSize]:
    """Every (model, profile) pair: measured ones sized, unmeasured ones listed as such."""
    out: list[PoolSize] = []
    for model_id in models or list(registry.models):
        spec = registry.models[model_id]
        if not isinstance(spec, LocalModelSpec):
            continue  # a remote model's capacity is its upstream's: nothing of it runs here
        for key in spec.profiles:
            out.append(size_pool(registry, model_id, key, demand))
    return out


def render(registry: Registry, demand: Demand, sizes: list[PoolSize]) -> str:
    lines = [
        f"demand: {demand.rps:g} requests/s x {demand.docs} documents = {demand.pairs_per_s:g} pairs/s; "
        f"documents of {demand.doc_tokens} tokens, queries of {demand.query_tokens}",
        f"{'model':30} {'profile':10} {'pair_tok':>8} {'pairs/s/worker':>14} {'workers':>7} {'n+1':>4} "
        f"{'cpu_cores':>9} {'1 req alone':>11}  basis",
    ]
    timeout = registry.server.request_timeout_s
    warnings: list[str] = []
    for s in sizes:
        if not s.measured:
            lines.append(f"{s.model_id:30} {s.profile:10} {s.pair_tokens:>8} {'-':>14} {'-':>7} {'-':>4} {'-':>9} {'-':>11}  {s.basis}")
            continue
        cores = "-" if s.cpu_cores is None else str(s.cpu_cores)
        lines.append(
            f"{s.model_id:30} {s.profile:10} {s.pair_tokens:>8} {s.pairs_per_s_per_worker:>14.1f} {s.workers:>7} "
            f"{s.workers + 1:>4} {cores:>9} {s.request_seconds:>10.2f}s  {s.basis}"
        )
        if s.request_seconds is not None and s.request_seconds > timeout:
            warnings.append(
                f"{s.model_id} on {s.profile}: one {demand.docs}-document request takes {s.request_seconds:.1f} s on an "
                f"idle worker, past server.request_timeout_s {timeout:g}: more workers do not shorten it"
            )
    lines += [
        "assumptions:",
        f"- a pair is query + document + {SPECIAL_TOKENS} special tokens, truncated at the profile's max_length",
        "- tokens/s measured by `tune` holds across pair lengths (linear cost); pairs/s alone assumes the measured length",
        f"- workers run at <= {demand.target_utilization:.0%} of measured throughput (queueing headroom); "
        "n+1 keeps capacity through a rolling restart or a lost node",
        "- GPU workers: one GPU each, the model alone on it; cpu: cores = workers x measured_cpu_cores",
        "- memory per card is `rerank-gateway plan --gpu TYPE` (without --rps)",
    ]
    lines += [f"warning: {w}" for w in warnings]
    if not any(s.measured for s in sizes):
        lines.append("no measured profile: run `rerank-gateway tune MODEL` on each hardware type and paste its profile")
    return "\n".join(lines)
