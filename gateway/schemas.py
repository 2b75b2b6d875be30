"""Typed response bodies of the gateway's own routes (models, usage, route report, health, ready, reload):
what the handlers return and what the OpenAPI document says. The rerank bodies live in dialects/ (one
module per dialect), the error body in gateway.http_errors."""

from __future__ import annotations

from typing import Literal

import msgspec

from tenancy.usage import UsageRow, UsageTotal


class UpstreamEndpoint(msgspec.Struct, kw_only=True, omit_defaults=True):
    url: str
    state: Literal["up", "probing", "ejected"]
    in_flight: int
    ejected_for_s: float | None = None
    last_error: str | None = None


class Upstream(msgspec.Struct, kw_only=True):
    """A `backend: remote` model's upstream: the dialect it speaks, the model it asks for, its endpoints."""

    dialect: str
    model: str
    endpoints: list[UpstreamEndpoint]


class LadderRung(msgspec.Struct, kw_only=True):
    """One budget of the ladder a profile-less GPU model's budget was chosen from (pool.local_loading)."""

    max_batch_tokens: int
    tokens_per_s: int
    peak_bytes: int


class BatchTime(msgspec.Struct, kw_only=True):
    """What a batch costs the device, learnt from the batches run (engine.batch_time): about floor_ms plus its
    tokens at tokens_per_s. On a GPU, CUDA-event time; on a CPU, the host's clock around the forward."""

    floor_ms: float
    tokens_per_s: int
    batches: int


class ModelInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    backend: str
    aliases: list[str]
    # A local model's device, precision and batching; a remote model has none here (its upstream does).
    profile: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_length: int | None = None
    max_batch_tokens: int | None = None
    # Where max_batch_tokens came from: the profile, or how it was chosen for a profile-less model.
    budget_reason: str | None = None
    # On a GPU with no profile: each budget measured at load; max_batch_tokens is the knee of it.
    budget_ladder: list[LadderRung] | None = None
    # Once a batch has run: its device time as learnt (what bounds bulk batches by time beside searches).
    batch_time: BatchTime | None = None
    # What runs the forward pass on a CPU: torch, openvino or onnxruntime (`runtime: auto` picks by measuring).
    runtime: str | None = None
    state: Literal["ready", "loading", "unavailable", "not_loaded", "off"]
    reason: str | None = None
    # backend: remote, once loaded.
    upstream: Upstream | None = None


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[ModelInfo]


class TenantUsage(msgspec.Struct, kw_only=True):
    object: Literal["usage"]
    tenant: str
    data: list[UsageRow]
    total: UsageTotal


class AllUsage(msgspec.Struct, kw_only=True):
    object: Literal["usage"]
    data: list[UsageRow]
    total: UsageTotal


class Health(msgspec.Struct):
    status: Literal["ok"]


class Readiness(msgspec.Struct, kw_only=True):
    ready: bool
    # True from the first SIGTERM on: the process is draining and a load balancer should stop sending.
    draining: bool
    models: dict[str, str]
    limits: str


class ShadowConfig(msgspec.Struct):
    model: str
    percent: float


class RouteConfig(msgspec.Struct, kw_only=True):
    split: dict[str, float]
    sticky: Literal["tenant", "user", "none"]
    fallback: list[str]
    shadow: ShadowConfig | None


class ScoreSummary(msgspec.Struct, kw_only=True):
    count: int
    mean: float | None
    p50: float | None
    p90: float | None


class Agreement(msgspec.Struct, kw_only=True):
    primary: str
    shadow: str
    compared: int
    top1_agreement: float | None
    overlap_at_k: dict[str, float | None]
    overlap_at_k_compared: dict[str, int]
    kendall_tau: float | None
    spearman: float | None


class ShadowScores(msgspec.Struct):
    primary: dict[str, ScoreSummary]
    shadow: dict[str, ScoreSummary]


class ShadowReport(msgspec.Struct, kw_only=True):
    requests: dict[str, int]
    agreement: list[Agreement]
    scores: ShadowScores


class Traffic(msgspec.Struct, kw_only=True):
    answered: dict[str, int]
    fallbacks: dict[str, dict[str, int]]


class RouteReport(msgspec.Struct, kw_only=True):
    route: str
    config: RouteConfig
    since: str
    traffic: Traffic
    shadow: ShadowReport


class ReloadedModels(msgspec.Struct, kw_only=True):
    added: list[str]
    removed: list[str]
    reloaded: list[str]
    kept: list[str]


class ReloadOutcome(msgspec.Struct, kw_only=True):
    status: Literal["reloaded"]
    registry: str
    models: ReloadedModels
    routes: list[str]
    # The other registry keys the reload changed, applied: server.* and limits.* keys, usage.path, tenants,
    # admin_api_key_sha256, gpu_types, default_model.
    changed: list[str]
