"""The registry: one YAML file, validated into typed structs. The single source of truth for its schema.

Everything the gateway serves is configuration as data: models with per-GPU-type profiles, the GPU types
themselves, server limits, tenants and routes. A bad file is refused whole, with the key path of the
first offending value.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal, Union

import msgspec
import yaml

from core import budgets

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
# Weight quantization: "nf4" is bitsandbytes 4-bit NormalFloat with double quantization; compute runs in `dtype`.
# "int8" is int8 on a CPU runtime (backends.runtimes): weight-only int8 on OpenVINO, dynamic int8 on ONNX Runtime.
Quantization = Literal["none", "nf4", "int8"]
# What a `backend: remote` upstream speaks (dialects has one module per dialect).
Dialect = Literal["cohere", "jina", "voyage", "tei", "vllm", "gateway"]
# Backends that load weights through bitsandbytes when asked for `quantization: nf4`.
QUANTIZABLE_BACKENDS = ("qwen3",)
# How a model's forward runs on a CPU (backends.runtimes): "auto" measures the installed runtimes at load
# and keeps the fastest; on a GPU every runtime but torch is refused and auto means torch.
Runtime = Literal["auto", "torch", "openvino", "onnxruntime"]
# Backends whose forward can run on the exported (ONNX / OpenVINO) runtimes, and so take `quantization: int8`.
EXPORTABLE_BACKENDS = ("embedding", "flag", "gte")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Registry structs refuse unknown keys: a typo in YAML must not be silently ignored."""


class Profile(_Strict):
    """Per-GPU-type overrides of a model's serving limits. Unset fields fall back to the model's own."""

    memory_budget_gb: float | None = None
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    max_length: int | None = None
    dtype: Dtype | None = None
    quantization: Quantization | None = None
    # Measured on one worker of this type with this profile (`rerank-gateway tune`), never paper figures:
    # sustained throughput, and for the cpu profile the cores it ran on. `plan --rps` sizes pools from them.
    measured_pairs_per_s: float | None = None
    measured_tokens_per_s: float | None = None
    measured_cpu_cores: int | None = None


class _Model(_Strict, tag_field="backend", kw_only=True):
    """What every model entry has. The entry's `backend` picks its class (a tagged union, ModelSpec): a
    local model's keys and a remote model's are each refused on the other, by the schema."""

    aliases: list[str] = []
    load: Literal["eager", "lazy", "off"] = "eager"

    @property
    def backend(self) -> str:
        return self.__struct_config__.tag


class LocalModelSpec(_Model, kw_only=True):
    """A model this process loads and runs (backends/, engine/)."""

    source: str  # a hub id, a directory, or package:<module> (backends.source)
    max_length: int = 512
    dtype: Dtype = "auto"
    quantization: Quantization = "none"
    runtime: Runtime = "auto"
    # Padding-free batches (backends.varlen) for the encoder cross-encoders: "auto" packs where a varlen
    # attention kernel runs (Ampere or newer GPUs, float16/bfloat16); "on" packs anywhere (elsewhere:
    # correct, attention pair by pair, not faster); "off" pads.
    padding_free: Literal["auto", "on", "off"] = "auto"
    trust_remote_code: bool = False
    # Qwen3-style rerankers: the instruction used when a request gives none.
    instruction: str | None = None
    # Defaults for the serving limits; a profile overrides them per GPU type. With max_batch_tokens unset
    # here and in the machine's profile, a budget is chosen for it (core.budgets).
    memory_budget_gb: float | None = None
    max_batch_tokens: int | None = None
    # Pairs per batch; unset: core.budgets.batch_pairs (256, more on a GPU with a bigger token budget).
    max_batch_size: int | None = None
    # "cpu" pins a model to the CPU even when a GPU is present.
    device: Literal["auto", "cpu"] = "auto"
    # Inference threads on a CPU, each single-threaded (one on a GPU). Two give the most throughput on a
    # 2-core machine (docs/benchmarks/2026-11-24-rerank-bench-amd-epyc.md, "What was tuned"); one keeps tail
    # latency lower for small models whose forward is mostly Python, where a second stream competes with the
    # event loop for the GIL.
    cpu_streams: int = 2
    # Footprints on a GPU at the profiles' precision, used by `rerank-gateway plan` before anything is
    # loaded: weights (GiB) and peak activation per token of a full batch (KiB).
    weights_gb: float | None = None
    activation_kb_per_token: float | None = None
    profiles: dict[str, Profile] = {}

    @property
    def origin(self) -> str:
        return self.source


class EmbeddingSpec(LocalModelSpec, tag="embedding"):
    """A bi-encoder: cosine of query and document embeddings (backends.embedding)."""


class FlagSpec(LocalModelSpec, tag="flag"):
    """An encoder cross-encoder, BGE-reranker style (backends.flag)."""


class GteSpec(LocalModelSpec, tag="gte"):
    """gte-multilingual-reranker (backends.gte)."""


class Qwen3Spec(LocalModelSpec, tag="qwen3"):
    """A Qwen3-Reranker: a causal LM's yes/no logits (backends.qwen3)."""


class RemoteModelSpec(_Model, tag="remote", kw_only=True):
    """A model another rerank service answers (pool.remote_runner), through a pool of endpoints."""

    dialect: Dialect
    endpoints: list[str]  # base URLs, one pool
    upstream_model: str | None = None  # the `model` sent upstream; the model id when unset
    api_key_env: str | None = None  # the name of the environment variable holding the key, never the key
    max_documents_per_call: int | None = None  # the dialect's own limit when unset
    timeout_s: float = 30.0
    max_concurrency_per_endpoint: int = 64

    @property
    def origin(self) -> str:
        return f"{self.dialect} upstream at {', '.join(self.endpoints)}"


# A registry's model entry, by its `backend` key.
ModelSpec = Union[EmbeddingSpec, FlagSpec, GteSpec, Qwen3Spec, RemoteModelSpec]
BACKEND_KINDS = {cls.__struct_config__.tag: cls for cls in typing.get_args(ModelSpec)}


def model_spec(backend: str, **fields: Any) -> ModelSpec:
    """A model entry built in code (tests, benchmarks), validated as the registry's are."""
    return msgspec.convert({"backend": backend, **fields}, ModelSpec)


class GpuType(_Strict):
    # Regular expression matched against a whole word run of torch.cuda.get_device_name(): it may not be
    # preceded or followed by a letter or digit, so "L4" never matches "NVIDIA L40S" nor "A10G?" "RTX A1000".
    match: str
    memory_gb: float
    bf16: bool = True
    # Dense fp16/bf16 tensor-core peak, for the benchmark's utilisation figure.
    peak_tflops: float | None = None


class ServerSettings(_Strict):
    max_documents: int = 10_000
    max_body_bytes: int = 64 * 1024 * 1024
    request_timeout_s: float = 60.0
    # Backpressure, per model: queued pairs and tokens past which new requests get 429.
    max_queue_pairs: int = 50_000
    max_queue_tokens: int = 8_000_000
    # Strict input: JSON nesting deeper than this is refused (400) before the body is decoded.
    max_json_depth: int = 32
    # Connection hygiene, enforced by server/http_server.py (docs/connections.md). A connection must send
    # its request head within header_timeout_s of opening (or of its next request's first byte) and its
    # body within body_timeout_s of the head; beyond max_connections new ones get a 503 and are closed.
    max_connections: int = 4096
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    # SIGTERM: in-flight requests get this long to finish; then queued work is failed with 503.
    drain_timeout_s: float = 30.0
    # Scored pairs one request may become once documents are split into chunks (max_chunks_per_doc); 400 past it.
    max_chunks_per_request: int = 100_000


# The server keys a registry reload cannot change (serving.reload refuses a reload that does, naming them):
# the HTTP app's body limit and the HTTP server's connection settings are fixed when they start. Every
# other key of the registry takes effect on reload.
RESTART_ONLY_KEYS = tuple(
    f"server.{key}"
    for key in (
        "max_body_bytes", "max_connections", "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s",
        "max_header_bytes", "max_headers", "drain_timeout_s",
    )
)


class Tenant(_Strict):
    api_key_sha256: str | list[str]
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    requests_per_minute: int | None = None
    search_units_per_day: int | None = None
    max_concurrent_requests: int | None = None
    priority: float = 1.0
    # A front door (another rerank-gateway calling with `dialect: gateway`): it may name the tenant each
    # request is for, which then gets its own fair share here; limits, access and usage stay this tenant's.
    forwards_tenants: bool = False


class LimitsConfig(_Strict):
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None
    # What to do when the shared store cannot be reached: keep serving (open) or refuse (closed).
    on_failure: Literal["open", "closed"] = "open"
    # The windows behind "per minute" and "per day" (fixed windows aligned to the epoch, so a day is a UTC
    # day). Only tests shorten them.
    rate_window_s: float = 60.0
    quota_window_s: float = 86400.0


class UsageConfig(_Strict):
    # SQLite file of the usage ledger; null turns metering off.
    path: str | None = "usage.sqlite3"


class Shadow(_Strict):
    model: str
    percent: float = 100.0


class Route(_Strict):
    split: dict[str, float]
    sticky: Literal["tenant", "user", "none"] = "none"
    fallback: list[str] = []
    shadow: Shadow | None = None


class Registry(_Strict):
    default_model: str
    models: dict[str, ModelSpec]
    gpu_types: dict[str, GpuType] = {}
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    admin_api_key_sha256: str | list[str] | None = None
    tenants: dict[str, Tenant] = {}
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    usage: UsageConfig = msgspec.field(default_factory=UsageConfig)
    routes: dict[str, Route] = {}


class RegistryError(ValueError):
    """A registry that cannot be used. The message names the file and the key path."""


def parse_registry(data: Any, origin: str = "registry") -> Registry:
    try:
        registry = msgspec.convert(data, Registry)
    except msgspec.ValidationError:
        raise RegistryError(f"{origin}: {_explain(data, Registry)}") from None
    problems = _semantic_problems(registry)
    if problems:
        raise RegistryError(f"{origin}: " + "; ".join(problems))
    return registry


class _RegistryLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: `true` and `false` only. PyYAML reads YAML 1.1, where yes/no/on/off
    are booleans too, so `load: off` or `padding_free: off`, written as a user writes them, arrived as
    False and the registry was refused ("Expected `str`, got `bool`"). Here they are the words they are;
    a boolean key given one of them is refused with "write true or false"."""


_RegistryLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RegistryLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(path: str | Path) -> Any:
    """A registry file's data; RegistryError naming the file when it cannot be read or is not YAML."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_RegistryLoader)
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from None


def load_registry(path: str | Path) -> Registry:
    return parse_registry(read_yaml(path), str(path))


def _explain(data: Any, cls: Any, prefix: str = "") -> str:
    """The first validation error with its full key path. msgspec writes map keys as `[...]`; users need
    the key (`models.bge.profiles.T4.dtype`), so descend into map-of-struct fields entry by entry (into a
    model entry's own class, picked by its `backend`)."""
    if isinstance(data, dict) and isinstance(cls, type):
        for name, hint in typing.get_type_hints(cls).items():
            value_type = typing.get_args(hint)[1] if typing.get_origin(hint) is dict else None
            if not _structs(value_type):
                continue
            entries = data.get(name)
            if not isinstance(entries, dict):
                continue
            for key, value in entries.items():
                try:
                    msgspec.convert(value, value_type)
                except msgspec.ValidationError:
                    return _explain(value, _member(value_type, value), f"{prefix}{name}.{key}.")
    try:
        msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = re.search(r" - at `\$(.*)`$", message)
        path = (prefix + (match.group(1).lstrip(".") if match else "")).rstrip(".") or "<root>"
        return f"{path}{_wording(message[: match.start()] if match else message, cls)}"
    return "invalid"


def _structs(hint: Any) -> list[type]:
    """The struct types a map's values may be: one, or the members of a tagged union (ModelSpec)."""
    members = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    return [m for m in members if isinstance(m, type) and issubclass(m, msgspec.Struct)]


def _member(hint: Any, value: Any) -> Any:
    """The struct a map value is checked as: the union member its tag names (the union when none does)."""
    members = _structs(hint)
    if len(members) == 1:
        return members[0]
    field = members[0].__struct_config__.tag_field
    tag = value.get(field) if isinstance(value, dict) else None
    return next((m for m in members if m.__struct_config__.tag == tag), hint)


def _wording(problem: str, cls: Any) -> str:
    """msgspec's words for a missing or unknown key, said as a registry's reader needs them."""
    missing = re.fullmatch(r"Object missing required field `(\w+)`", problem)
    unknown = re.fullmatch(r"Object contains unknown field `(\w+)`", problem)
    kind = cls.__struct_config__.tag if isinstance(cls, type) and issubclass(cls, msgspec.Struct) else None
    if missing:
        return f".{missing.group(1)}: required" + (f" by backend: {kind}" if kind else "")
    if unknown:
        key = unknown.group(1)
        if kind and kind != "remote" and key in RemoteModelSpec.__struct_fields__:
            return f".{key}: only for backend: remote"
        if kind == "remote" and key in LocalModelSpec.__struct_fields__:
            return f".{key}: only for a local backend ({', '.join(k for k in BACKEND_KINDS if k != 'remote')})"
        return f".{key}: not a registry key" + (f" of backend {kind}" if kind else "")
    if problem == "Expected `bool`, got `str`":
        return ": write true or false"
    return f": {problem}"


def _semantic_problems(reg: Registry) -> list[str]:
    problems: list[str] = []
    names: dict[str, str] = {}
    for model_id, spec in reg.models.items():
        for name in [model_id, *spec.aliases]:
            if name in names and names[name] != model_id:
                problems.append(f"models.{model_id}.aliases: {name!r} is already a name of model {names[name]!r}")
            names[name] = model_id
        problems.extend(_local_problems(model_id, spec, reg) if isinstance(spec, LocalModelSpec) else _remote_problems(model_id, spec))
    for route_name, route in reg.routes.items():
        if route_name in names:
            problems.append(f"routes.{route_name}: the name is already a model id or alias")
        if not route.split:
            problems.append(f"routes.{route_name}.split: needs at least one model")
        for target in [*route.split, *route.fallback, *([route.shadow.model] if route.shadow else [])]:
            if target not in names:
                problems.append(f"routes.{route_name}: unknown model {target!r}")
        if any(w < 0 for w in route.split.values()) or sum(route.split.values()) <= 0:
            problems.append(f"routes.{route_name}.split: weights must be >= 0 with a positive sum")
    if reg.default_model not in names and reg.default_model not in reg.routes:
        problems.append(f"default_model: {reg.default_model!r} is not a model id, alias or route")
    for name, gpu in reg.gpu_types.items():
        try:
            re.compile(gpu.match)
        except re.error as exc:
            problems.append(f"gpu_types.{name}.match: not a regular expression: {exc}")
    key_owner: dict[str, str] = {}
    for owner, value in [("admin_api_key_sha256", reg.admin_api_key_sha256)] + [
        (f"tenants.{name}.api_key_sha256", t.api_key_sha256) for name, t in reg.tenants.items()
    ]:
        for h in key_hashes(value):
            if not re.fullmatch(r"[0-9a-f]{64}", h):
                problems.append(f"{owner}: not a lowercase hex sha256")
            elif h in key_owner and key_owner[h] != owner:
                problems.append(f"{owner}: the same key hash is already in {key_owner[h]}")
            key_owner.setdefault(h, owner)
    for tenant_name, tenant in reg.tenants.items():
        if not key_hashes(tenant.api_key_sha256):
            problems.append(f"tenants.{tenant_name}.api_key_sha256: needs at least one hash")
        for m in tenant.models:
            if m != "*" and m not in names and m not in reg.routes:
                problems.append(f"tenants.{tenant_name}.models: unknown model {m!r}")
        if tenant.priority <= 0:
            problems.append(f"tenants.{tenant_name}.priority: must be > 0 (it is a fair-share weight)")
        for field in ("requests_per_minute", "search_units_per_day", "max_concurrent_requests"):
            if (getattr(tenant, field) or 0) < 0:
                problems.append(f"tenants.{tenant_name}.{field}: must be >= 0")
    server = reg.server
    for field in ("max_json_depth", "max_connections", "max_header_bytes", "max_headers", "max_documents", "max_body_bytes"):
        if getattr(server, field) < 1:
            problems.append(f"server.{field}: must be at least 1")
    for field in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "request_timeout_s"):
        if getattr(server, field) <= 0:
            problems.append(f"server.{field}: must be > 0")
    if server.drain_timeout_s < 0:
        problems.append("server.drain_timeout_s: must be >= 0")
    if reg.limits.backend == "redis" and not reg.limits.url:
        problems.append("limits.url: required when limits.backend is redis")
    if reg.limits.rate_window_s <= 0 or reg.limits.quota_window_s <= 0:
        problems.append("limits: rate_window_s and quota_window_s must be > 0")
    return problems


def _local_problems(model_id: str, spec: LocalModelSpec, reg: Registry) -> list[str]:
    problems: list[str] = []
    for key, profile in spec.profiles.items():
        if key != "cpu" and key not in reg.gpu_types:
            problems.append(f"models.{model_id}.profiles.{key}: not 'cpu' and not a key of gpu_types")
        elif key != "cpu" and (profile.dtype or spec.dtype) == "bfloat16" and not reg.gpu_types[key].bf16:
            problems.append(f"models.{model_id}.profiles.{key}.dtype: bfloat16 on a GPU type without bf16")
        for field in ("measured_pairs_per_s", "measured_tokens_per_s", "measured_cpu_cores"):
            if getattr(profile, field) is not None and getattr(profile, field) <= 0:
                problems.append(f"models.{model_id}.profiles.{key}.{field}: must be > 0")
    quantized = [spec.quantization, *(p.quantization for p in spec.profiles.values())]
    if "nf4" in quantized and spec.backend not in QUANTIZABLE_BACKENDS:
        problems.append(f"models.{model_id}.quantization: nf4 is supported by the {', '.join(QUANTIZABLE_BACKENDS)} backend only")
    if spec.backend not in EXPORTABLE_BACKENDS and ("int8" in quantized or spec.runtime not in ("auto", "torch")):
        problems.append(
            f"models.{model_id}: runtime {spec.runtime} / quantization int8 need a backend of {', '.join(EXPORTABLE_BACKENDS)}"
        )
    if spec.cpu_streams < 1:
        problems.append(f"models.{model_id}.cpu_streams: must be at least 1")
    if spec.max_length < 8:
        problems.append(f"models.{model_id}.max_length: must be at least 8")
    return problems


def _remote_problems(model_id: str, spec: RemoteModelSpec) -> list[str]:
    where = f"models.{model_id}"
    out = []
    if not spec.endpoints:
        out.append(f"{where}.endpoints: needs at least one base URL")
    for i, url in enumerate(spec.endpoints):
        if not re.fullmatch(r"https?://[^\s/@]+(/\S*)?", url):
            out.append(f"{where}.endpoints[{i}]: not an http(s) base URL without credentials")
    if spec.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", spec.api_key_env):
        out.append(f"{where}.api_key_env: not an environment variable name (the key itself never goes in the file)")
    if spec.max_documents_per_call is not None and spec.max_documents_per_call < 1:
        out.append(f"{where}.max_documents_per_call: must be at least 1")
    if spec.timeout_s <= 0:
        out.append(f"{where}.timeout_s: must be > 0")
    if spec.max_concurrency_per_endpoint < 1:
        out.append(f"{where}.max_concurrency_per_endpoint: must be at least 1")
    return out


def key_hashes(value: str | list[str] | None) -> list[str]:
    """An `api_key_sha256` value (one hash or several, for key rotation) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


# --- profile selection -------------------------------------------------------------------------------


class Effective(msgspec.Struct, frozen=True, kw_only=True):
    """A model's limits after its profile for this machine is applied: what the engine runs with."""

    profile: str
    device: str  # "cpu" or "cuda"
    dtype: Dtype
    quantization: Quantization
    max_length: int
    max_batch_tokens: int
    max_batch_size: int
    memory_budget_gb: float | None
    # Where max_batch_tokens came from, as /v1/models reports it.
    budget_reason: str = ""
    # True on a GPU when no profile or model field sets the budget: the pool sizes it from the warm-up,
    # and max_batch_tokens is only the probe's size until then.
    auto_budget: bool = False
    # Whether the registry set max_batch_size (else it follows the token budget, core.budgets.batch_pairs).
    max_batch_size_set: bool = False


def detect_gpu_type(reg: Registry, device_name: str | None) -> str:
    """The profile key for a device name; "cpu" when there is no GPU, the longest matching key otherwise."""
    if device_name is None:
        return "cpu"
    hits = [(len(gpu.match), key) for key, gpu in reg.gpu_types.items() if gpu_name_matches(gpu.match, device_name)]
    return max(hits)[1] if hits else "unknown-gpu"


def gpu_name_matches(pattern: str, device_name: str) -> bool:
    """`pattern` found in the name with no letter or digit right before or after it."""
    return re.search(rf"(?<![0-9A-Za-z])(?:{pattern})(?![0-9A-Za-z])", device_name) is not None


def effective(spec: LocalModelSpec, gpu_type: str, *, cpu_cores: int | None = None) -> Effective:
    device = "cpu" if gpu_type == "cpu" or spec.device == "cpu" else "cuda"
    key = "cpu" if device == "cpu" else gpu_type
    chosen = spec.profiles.get(key)
    profile = chosen or Profile()
    dtype = profile.dtype or spec.dtype
    max_length = profile.max_length or spec.max_length
    auto = False
    if profile.max_batch_tokens:
        tokens, why = profile.max_batch_tokens, f"profile {key}"
    elif spec.max_batch_tokens:
        tokens, why = spec.max_batch_tokens, "the model's max_batch_tokens in the registry"
    elif device == "cpu":
        tokens, why = budgets.cpu_budget(spec.backend, spec.cpu_streams, cpu_cores)
    else:
        tokens, why, auto = budgets.gpu_probe_tokens(max_length), "auto: to be sized by the warm-up", True
    return Effective(
        profile=key if chosen else "default",
        device=device,
        dtype=dtype,
        quantization=profile.quantization or spec.quantization,
        max_length=max_length,
        max_batch_tokens=tokens,
        max_batch_size=profile.max_batch_size or spec.max_batch_size or budgets.batch_pairs(tokens, device),
        max_batch_size_set=bool(profile.max_batch_size or spec.max_batch_size),
        memory_budget_gb=profile.memory_budget_gb if profile.memory_budget_gb is not None else spec.memory_budget_gb,
        budget_reason=why,
        auto_budget=auto,
    )


def gpu_models(reg: Registry, gpu_type: str) -> int:
    """How many of the registry's models load on the GPU of this type: a profile-less model's memory budget
    is an even share of the card among them (pool.local_loading)."""
    return sum(
        1 for spec in reg.models.values()
        if isinstance(spec, LocalModelSpec) and spec.load != "off" and effective(spec, gpu_type).device == "cuda"
    )


def name_index(reg: Registry) -> dict[str, str]:
    """Every name a request may use for a model (ids and aliases) -> model id."""
    out: dict[str, str] = {}
    for model_id, spec in reg.models.items():
        out[model_id] = model_id
        for alias in spec.aliases:
            out[alias] = model_id
    return out
