"""CPU runtimes: how a backend's model call runs, under the engine's own batching.

A backend (embedding, flag, gte) exposes its scoring module: the part of forward from the collated
tensors to float32 raw outputs. On a CPU that module can run on
- torch: the module itself, eager, in the backend's dtype (bfloat16 where the CPU has native bf16);
- openvino: the module converted to OpenVINO IR, compiled (bf16 where native); with `quantization: int8`
  its weights in int8 (NNCF weight compression), the math in bf16 / f32;
- onnxruntime: the ONNX export on ONNX Runtime, float32, or dynamic int8 with `quantization: int8`.
The registry's `runtime` picks one; `auto` (the default) builds every installed one, times each on a
batch of the shape the engine runs, keeps the fastest, and remembers the decision on disk for this model,
CPU and library versions. Exports are cached on disk (backends.runtimes.cache) and checked against the
torch module in float32 on a batch of another shape before they serve, and an int8 one also on the
ranking of a set of pairs; one that disagrees is refused.
On a GPU only torch runs (its fp16 kernels are the fast path there).

ONNX Runtime and OpenVINO (with NNCF for int8) are optional (`pip install rerank-gateway[onnx,openvino]`);
without them auto means torch.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from backends.runtimes.base import Runtime, TorchRuntime
from backends.runtimes.cache import EXPORT_FORMAT, cached_export, invalidate, model_revision, read_choice, write_choice
from backends.source import resolve_source
from core.host import CPU_STREAM_NICE, at_cpu_priority, cpu_model_name, cpu_stream_split

log = logging.getLogger("rerank_gateway.runtimes")

EXPORTED = ("openvino", "onnxruntime")
# int8 on OpenVINO is weight-only (bf16 math on AMX / AVX512-BF16): it keeps the ranking (Spearman 0.999
# against float32 on the benchmark) where ONNX Runtime's dynamic int8 (activations too) ranks at 0.95. In
# this order, `runtime: auto` with int8 takes the first that builds and passes its checks, not the fastest:
# int8 is asked for its memory, and on a CPU without AMX ONNX Runtime's int8 was the faster one, passed the
# ranking check's 48 pairs and then ranked MiniLM's embeddings of 40 sentences at Spearman 0.96.
INT8_RUNTIMES = ("openvino", "onnxruntime")
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
# What each runtime needs installed for int8 besides itself.
_INT8_MODULES = {"onnxruntime": (), "openvino": ("nncf",)}
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}
# auto times each candidate on batches of this many tokens at most (the engine's batch shape, capped so a
# big token budget does not make loading slow), in interleaved rounds.
AUTO_BATCH_TOKENS = 2048
AUTO_LENGTH = 128
AUTO_ROUNDS = 3
# An exported runtime must beat torch by this much to be chosen: torch needs no export and no second copy
# of the weights, and smaller differences are within a shared machine's noise.
AUTO_MARGIN = 0.05
# Agreement an export must show with the float32 torch module before it serves: max |diff| over the
# larger of 1 and the outputs' magnitude. Loose enough for bf16 / int8 rounding, far below what a broken
# graph (a shape baked in at trace time, a dropped mask) gives.
VERIFY_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "int8": 0.3}
# An int8 export must also rank a set of pairs as float32 does (the bar for `quantization: int8`):
# Spearman over RANK_CHECK_PAIRS pairs of up to RANK_CHECK_TOKENS tokens, words drawn from the model's own
# vocabulary with a fixed seed.
INT8_MIN_SPEARMAN = 0.99
RANK_CHECK_PAIRS = 48
RANK_CHECK_TOKENS = 64


class RuntimeUnavailable(RuntimeError):
    pass


def installed(name: str, int8: bool = False) -> bool:
    if name == "torch":
        return True
    modules = (_MODULES[name], *(_INT8_MODULES[name] if int8 else ()))
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _candidates(backend: Any) -> list[str]:
    """The runtimes this backend may run on, per its registry entry and what is installed. Raises
    RuntimeUnavailable when what the entry asks for cannot run here."""
    spec, eff = backend.spec, backend.eff
    wanted, int8 = spec.runtime, eff.quantization == "int8"
    if backend.device.type != "cpu":
        if wanted not in ("auto", "torch") or int8:
            raise RuntimeUnavailable(f"runtime {wanted}{' / int8' if int8 else ''} runs on the CPU only; this model is on {backend.device}")
        return ["torch"]
    if int8:
        if wanted == "torch":
            raise RuntimeUnavailable(f"quantization int8 runs on {', '.join(INT8_RUNTIMES)}, not torch")
        candidates = [r for r in INT8_RUNTIMES if wanted in ("auto", r)]
        if not candidates:
            raise RuntimeUnavailable(f"quantization int8 runs on {', '.join(INT8_RUNTIMES)}, not {wanted}")
        if wanted == "auto":
            # Whichever int8 runtime is installed; none: the error below names the first one's extra.
            candidates = [r for r in candidates if installed(r, int8=True)] or candidates[:1]
    elif wanted == "auto":
        return ["torch", *(r for r in EXPORTED if installed(r))]
    else:
        candidates = [wanted]
    for name in candidates:
        if not installed(name, int8):
            raise RuntimeUnavailable(f"runtime {name}{' int8' if int8 else ''} is not installed: pip install 'rerank-gateway[{EXTRAS[name]}]'")
    return candidates


def may_export(backend: Any) -> bool:
    """Whether start_runtime may build an exported runtime for this backend (so load() should read the
    checkpoint's float32 weights: an export made from bf16-rounded weights would carry their rounding)."""
    if not backend.exportable:
        return False  # the backend runs on torch only
    try:
        return _candidates(backend) != ["torch"]
    except RuntimeUnavailable:
        return False  # start_runtime reports it


def start_runtime(backend: Any) -> Runtime:
    """The runtime a loaded backend's forward runs on, per its registry entry. Raises RuntimeUnavailable
    (the model is then unavailable, with the reason) when the asked-for runtime cannot run here.

    Built on a thread at the inference streams' priority: the runtimes start worker threads that run much of
    each inference (OpenVINO's TBB workers, process-wide, when it first converts or compiles; ONNX Runtime's
    intra-op pool with the session), and threads inherit the priority of the thread that starts them. Built
    on the loading thread they ran at nice 0, level with the event loop and above the bulk tokenizer lane
    (OpenVINO, a 1,000-document request of bench.host_path: 310 ms of its CPU at nice 0, 90 ms on the
    streams)."""
    return at_cpu_priority(CPU_STREAM_NICE, lambda: _start_runtime(backend))


def _start_runtime(backend: Any) -> Runtime:
    candidates = _candidates(backend)
    module = backend.scoring_module()
    if candidates == ["torch"]:
        backend.runtime = TorchRuntime(module, backend.dtype)
        return backend.runtime
    # The model was loaded in float32 (load_dtype): torch serves a copy cast to the backend's dtype.
    if backend.dtype == torch.float32:
        torch_module = module
    else:
        torch_module = copy.deepcopy(module).to(backend.dtype)
    torch_runtime = TorchRuntime(torch_module, backend.dtype)
    backend.runtime = torch_runtime  # the samples below are prepared through it (the embedding backend's query)
    builder = _Builder(backend, module, torch_runtime)
    try:
        if len(candidates) == 1:
            runtime = builder.build(candidates[0])
        elif backend.eff.quantization == "int8":
            runtime = _first_that_builds(builder, candidates)
        else:
            runtime = _choose(builder, candidates)
    finally:
        builder.close()
    if runtime is torch_runtime:
        backend.model = torch_module.model
    else:
        # The exported copy serves: free the torch weights (the config stays for the backend to read).
        backend.model = module.model.to("meta")
    runtime.release_thread()
    log.info("model %s runs on %s", backend.name, runtime.describe())
    return runtime


class _Builder:
    """Builds (or loads from the export cache) and verifies each runtime for one backend."""

    def __init__(self, backend: Any, module: torch.nn.Module, torch_runtime: TorchRuntime) -> None:
        self.backend = backend
        self.module = module
        self.torch_runtime = torch_runtime
        self.streams, self.threads = cpu_stream_split(backend.spec.cpu_streams)
        self.sample = _sample_inputs(backend, [5, 11])
        self.check = _sample_inputs(backend, [3, 17, 9])
        source = resolve_source(backend.spec.source)
        self.key = {
            "backend": backend.spec.backend,
            "source": source,
            "revision": model_revision(source),
            "inputs": list(self.sample),
            "trust_remote_code": backend.spec.trust_remote_code,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "format": EXPORT_FORMAT,
        }
        self._fp32: torch.nn.Module | None = None
        self._reference: dict[str, torch.Tensor] = {}
        self._rank_check: dict[str, torch.Tensor] | None = None
        self.seconds: dict[str, float] = {}

    def close(self) -> None:
        self._fp32 = None

    @property
    def fp32(self) -> torch.nn.Module:
        """The scoring module in float32: the exports' source and the reference they are checked against."""
        if self._fp32 is None:
            params = list(self.module.parameters())
            if all(p.dtype == torch.float32 for p in params):
                self._fp32 = self.module
            else:
                self._fp32 = copy.deepcopy(self.module).float().eval()
        return self._fp32

    @property
    def rank_check(self) -> dict[str, torch.Tensor]:
        if self._rank_check is None:
            self._rank_check = _rank_check_inputs(self.backend)
        return self._rank_check

    def reference(self, which: str = "check") -> torch.Tensor:
        if which not in self._reference:
            with torch.inference_mode():
                self._reference[which] = self.fp32(**getattr(self, which)).float()
        return self._reference[which]

    def _export(self, runtime: str, precision: str, versions: dict[str, str], build: Callable[[Path], None]) -> Path:
        key = {**self.key, "runtime": runtime, "precision": precision, **versions}
        return cached_export(f"{self.backend.name}-{runtime}-{precision}", key, build)

    def onnx_fp32(self) -> Path:
        from backends.runtimes.onnx import export_onnx

        return self._export("onnx", "float32", {}, lambda folder: export_onnx(self.fp32, self.sample, folder))

    def build(self, name: str) -> Runtime:
        if name == "torch":
            return self.torch_runtime
        for attempt in (1, 2):
            folder, runtime = self._load(name)
            problem = self._verify(runtime)
            if problem is None:
                return runtime
            # A whole file that gives wrong scores: drop it; a rebuild from the current code may be right.
            invalidate(folder)
            log.warning("model %s: %s export disagrees with torch (%s)%s", self.backend.name, name, problem,
                        "; rebuilding it" if attempt == 1 else "")
        raise RuntimeUnavailable(f"the {name} export of model {self.backend.name!r} disagrees with torch: {problem}")

    def _load(self, name: str) -> tuple[Path, Runtime]:
        int8 = self.backend.eff.quantization == "int8"
        if name == "onnxruntime":
            from backends.runtimes.onnx import OnnxRuntime, quantize_int8

            folder = self.onnx_fp32()
            if int8:
                versions = {"onnxruntime": _version("onnxruntime")}
                folder = self._export("onnxruntime", "int8", versions, lambda out: quantize_int8(self.onnx_fp32(), out))
            return folder, OnnxRuntime(folder, precision="int8" if int8 else "float32", threads=self.threads)
        if name == "openvino":
            from backends.runtimes.openvino import OpenVinoRuntime, compress_int8, convert_ir, survives

            versions = {"openvino": _version("openvino")}
            folder = self._export("openvino", "float32", versions, lambda out: convert_ir(self.fp32, self.sample, out))
            compute = str(self.backend.dtype).removeprefix("torch.")
            if int8:
                source = folder
                versions["nncf"] = _version("nncf")
                folder = self._export("openvino", "int8", versions, lambda out: compress_int8(source, out))
            problem = survives(folder, compute, self.sample)
            if problem is not None:
                raise RuntimeUnavailable(problem)
            runtime = OpenVinoRuntime(
                folder, precision="int8" if int8 else compute, compute=compute, streams=self.streams, threads=self.threads
            )
            return folder, runtime
        raise RuntimeUnavailable(f"unknown runtime {name!r}")

    def _verify(self, runtime: Runtime) -> str | None:
        with torch.inference_mode():
            out = runtime(self.check).float()
        ref = self.reference()
        if out.shape != ref.shape:
            return f"output shape {tuple(out.shape)}, torch gives {tuple(ref.shape)}"
        if not torch.isfinite(out).all():
            return "non-finite outputs"
        diff = (out - ref).abs().max().item()
        allowed = VERIFY_TOLERANCE.get(runtime.precision, 1e-3) * max(1.0, ref.abs().max().item())
        if diff > allowed:
            return f"max |diff| {diff:.3g} > {allowed:.3g}"
        if runtime.precision == "int8":
            with torch.inference_mode():
                ranked, expected = runtime(self.rank_check).float(), self.reference("rank_check")
            if ranked.dim() == 2:
                # Embeddings (the bi-encoder): rank the pairs by similarity to one fixed vector.
                probe = expected.mean(0)
                ranked, expected = ranked @ probe, expected @ probe
            rho = spearman(ranked, expected)
            if not rho >= INT8_MIN_SPEARMAN:
                return f"its ranking of {len(ranked)} pairs agrees with float32 at Spearman {rho:.3f} < {INT8_MIN_SPEARMAN}"
        return None


def _first_that_builds(builder: _Builder, candidates: list[str]) -> Runtime:
    """auto with int8: the first candidate (INT8_RUNTIMES' order: the one that keeps the ranking best) that
    builds and passes its checks."""
    failures = []
    for name in candidates:
        try:
            runtime = builder.build(name)
        except Exception as exc:  # noqa: BLE001 - auto goes on to the next int8 runtime
            failures.append(f"{name}: {f'{type(exc).__name__}: {exc}'.splitlines()[0]}")
            log.warning("model %s: int8 runtime %s skipped: %s", builder.backend.name, name, failures[-1])
            continue
        builder.backend.runtime_report = {"chosen": name, "skipped": failures, "from": "int8 order"}
        return runtime
    raise RuntimeUnavailable("no int8 runtime could run this model: " + "; ".join(failures))


def _choose(builder: _Builder, candidates: list[str]) -> Runtime:
    """auto: the fastest candidate on a batch of the engine's shape, or the stored decision for it."""
    backend = builder.backend
    eff = backend.eff
    length = max(2, min(eff.max_length, AUTO_LENGTH))
    n = max(1, min(eff.max_batch_size, min(eff.max_batch_tokens, AUTO_BATCH_TOKENS) // length))
    key = {
        **builder.key, "choice_among": candidates, "quantization": eff.quantization, "dtype": str(backend.dtype),
        "cpu": cpu_model_name(), "streams": builder.streams, "threads": builder.threads, "batch": [n, length],
        **{r: _version(_MODULES[r]) for r in candidates if r != "torch"},
    }
    stored = read_choice(key)
    if stored and stored.get("runtime") in candidates:
        try:
            runtime = builder.build(stored["runtime"])
            backend.runtime_report = {"chosen": runtime.name, "seconds": stored.get("seconds", {}), "from": "stored"}
            return runtime
        except Exception as exc:  # noqa: BLE001 - a stored choice that no longer loads is measured afresh
            log.warning("model %s: stored runtime %s failed to load (%s); measuring again", backend.name, stored["runtime"], exc)
    built: dict[str, Runtime] = {}
    for name in candidates:
        try:
            built[name] = builder.build(name)
        except Exception as exc:  # noqa: BLE001 - auto skips a runtime that cannot run this model
            log.warning("model %s: runtime %s skipped: %s", backend.name, name, f"{type(exc).__name__}: {exc}".splitlines()[0])
    if not built:
        raise RuntimeUnavailable("no runtime could run this model")
    batch = backend.collate(backend.synthetic_rows([length] * n))
    seconds = _time_interleaved(built, batch, builder.threads)
    best = min(seconds, key=seconds.get)
    if "torch" in seconds and seconds[best] > seconds["torch"] * (1 - AUTO_MARGIN):
        best = "torch"
    log.info(
        "model %s: runtime auto on %d x %d tokens: %s -> %s", backend.name, n, length,
        ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in seconds.items()), best,
    )
    write_choice(key, {"runtime": best, "seconds": seconds})
    backend.runtime_report = {"chosen": best, "seconds": seconds, "from": "measured"}
    return built[best]


def _time_interleaved(runtimes: dict[str, Runtime], batch: Any, threads: int) -> dict[str, float]:
    """Median seconds per batch of each runtime, on the calling thread, rounds interleaved so that a
    change in the machine's load hits every candidate alike."""
    # One stream's share of the cores, as the engine will run it (process-wide; the engine sets the same).
    torch.set_num_threads(threads)
    samples: dict[str, list[float]] = {name: [] for name in runtimes}
    with torch.inference_mode():
        for rnd in range(AUTO_ROUNDS + 1):
            for name, runtime in runtimes.items():
                start = time.perf_counter()
                runtime(batch.inputs)
                if rnd:  # the first round warms up
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (no tie correction: the scores are floats)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    n = len(a)
    return 1 - 6 * float(((ra - rb) ** 2).sum()) / (n * (n * n - 1))


def _rank_check_inputs(backend: Any) -> dict[str, torch.Tensor]:
    """RANK_CHECK_PAIRS pairs of varied words and lengths (fixed seed), collated as the engine would."""
    vocab = backend.tokenizer.get_vocab() if backend.tokenizer is not None else {}
    # Whole words of the model's own vocabulary (WordPiece, SentencePiece's "▁", byte-level BPE's "Ġ").
    words = sorted({w.lstrip("\u2581\u0120") for w in vocab})
    words = [w for w in words if w.isascii() and w.isalpha() and w.islower() and len(w) >= 3]
    if len(words) < 100:
        words = "the river runs through the city and the music of water is light over stone".split()
    rng = random.Random(13)
    query = " ".join(rng.choices(words, k=6))
    docs = [" ".join(rng.choices(words, k=rng.randint(4, RANK_CHECK_TOKENS))) for _ in range(RANK_CHECK_PAIRS)]
    length = min(backend.eff.max_length, RANK_CHECK_TOKENS)
    prepared = backend.prepare(query, docs, max_length=length, max_chunks=1, instruction=None)
    return backend.collate(prepared.rows()).inputs


def _sample_inputs(backend: Any, lengths: list[int]) -> dict[str, torch.Tensor]:
    """A collated batch of real pairs from the backend's own prepare, documents of the given word counts
    (so rows differ in length and some are padded)."""
    words = "the river runs through the city and the music of water is light".split()
    docs = [" ".join(words[i % len(words)] for i in range(k)) for k in lengths]
    prepared = backend.prepare(
        "river city music", docs, max_length=min(backend.eff.max_length, 64), max_chunks=1, instruction=None
    )
    return backend.collate(prepared.rows()).inputs
