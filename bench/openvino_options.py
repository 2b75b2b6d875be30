"""OpenVINO options for the CPU runtime, measured in-process on the runtime benchmark's 1,000 documents: the
IR's source (OpenVINO's PyTorch frontend or the ONNX export), streams x threads, and the int8 variants
(NNCF weight-only, static with and without SmoothQuant / kept layers), each for pairs/s and ranking against
torch float32. What backends/runtimes/openvino.py chose is the fastest that keeps Spearman >= 0.99.

    python -m bench.openvino_options                                 # ~3 min on 2 cores
    python -m bench.openvino_options --variants pt:bf16:2x1,onnx:bf16:2x1 --budget 4096

A variant is SOURCE:MODEL:STREAMSxTHREADS. SOURCE: pt | onnx. MODEL: bf16 | f32 | w8 (weight-only int8) |
static | static-sq (SmoothQuant, alpha 0.5) | static-head (classifier and pooler kept in float) |
static-mixed (NNCF's mixed preset). Batches are the engine's: pairs sorted by length, cut under the token
budget; STREAMS Python threads take batches in turn, each with its own infer request. int8 models compile
one one-stream copy per thread (backends/runtimes/openvino.py says why).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "onnx:bf16:2x1,pt:bf16:2x1,pt:bf16:1x2,pt:w8:2x1,pt:static:2x1,pt:static-sq:2x1,pt:static-head:2x1,pt:static-mixed:2x1"
CALIBRATION_PAIRS = 300


def batches(backend, prepared, budget: int) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    order = sorted(range(prepared.n_items), key=lambda i: int(prepared.lengths[i]))
    out, rows, width = [], [], 0
    for i in order:
        n = int(prepared.lengths[i])
        if rows and max(width, n) * (len(rows) + 1) > budget:
            out.append(rows)
            rows, width = [], 0
        rows.append(i)
        width = max(width, n)
    out.append(rows)
    return [(r, backend.collate(prepared.rows(r)).inputs) for r in out]


def quantize_static(ir: Path, out: Path, kind: str, calibration: list[dict[str, torch.Tensor]]) -> None:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    model = ov.Core().read_model(str(ir / "model.xml"))
    names = [i.get_any_name() for i in model.inputs]
    ignored = None
    if kind == "static-head":
        matmuls = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]
        ignored = nncf.IgnoredScope(names=matmuls[-2:])  # the pooler and the classifier
    model = nncf.quantize(
        model, nncf.Dataset(calibration, lambda inputs: {n: inputs[n].numpy() for n in names}),
        model_type=nncf.ModelType.TRANSFORMER, subset_size=CALIBRATION_PAIRS, ignored_scope=ignored,
        preset=nncf.QuantizationPreset.MIXED if kind == "static-mixed" else nncf.QuantizationPreset.PERFORMANCE,
        fast_bias_correction=True,
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=0.5 if kind == "static-sq" else -1)
        ),
    )
    ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=DEFAULT)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "rerank-bench-minilm-ce"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import openvino as ov

    from backends.flag import FlagBackend
    from backends.runtimes import spearman
    from backends.runtimes.onnx import export_onnx
    from backends.runtimes.openvino import compress_int8, convert_ir
    from bench.models import build_minilm_cross_encoder
    from bench.workload import big_request, small_requests, vocabulary
    from core.config import effective, model_spec

    model_dir = build_minilm_cross_encoder(Path(args.model_dir))
    spec = model_spec(backend="flag", source=str(model_dir), max_length=512, dtype="float32", runtime="torch")
    backend = FlagBackend("bench", spec, effective(spec, "cpu"))
    backend.load()
    req = big_request(vocabulary(model_dir), args.docs)
    prepared = backend.prepare(req.query, req.documents, max_length=512, max_chunks=1, instruction=None)
    work = batches(backend, prepared, args.budget)
    reference = torch.empty(prepared.n_items)
    with torch.inference_mode():
        for rows, inputs in work:
            reference[torch.tensor(rows)] = backend.runtime(inputs)
    # Calibration pairs for static int8: other requests of the same kind (another seed), never the measured ones.
    calibration = []
    for r in small_requests(vocabulary(model_dir), CALIBRATION_PAIRS // 20, 20):
        prepared = backend.prepare(r.query, r.documents, max_length=512, max_chunks=1, instruction=None)
        calibration += [inputs for _, inputs in batches(backend, prepared, args.budget)]

    folder = Path(tempfile.mkdtemp(prefix="openvino-options-"))
    module, sample = backend.scoring_module(), work[0][1]
    models: dict[str, Path] = {}

    def model_path(source: str, kind: str) -> Path:
        key = f"{source}-{'fp32' if kind in ('bf16', 'f32') else kind}"
        if key not in models:
            out = folder / key
            out.mkdir()
            if kind in ("bf16", "f32") and source == "onnx":
                export_onnx(module, sample, out)
                ov.save_model(ov.convert_model(str(out / "model.onnx")), str(out / "model.xml"), compress_to_fp16=False)
            elif kind in ("bf16", "f32"):
                convert_ir(module, sample, out)
            elif kind == "w8":
                compress_int8(model_path(source, "f32"), out)
            else:
                quantize_static(model_path(source, "f32"), out, kind, calibration)
            models[key] = out
        return models[key]

    core = ov.Core()
    runners = {}
    for variant in args.variants.split(","):
        source, kind, split = variant.split(":")
        streams, threads = map(int, split.split("x"))
        model = core.read_model(str(model_path(source, kind) / "model.xml"))
        config = {"INFERENCE_PRECISION_HINT": "f32" if kind == "f32" else "bf16", "ENABLE_CPU_PINNING": False}
        if kind in ("bf16", "f32"):
            one = core.compile_model(model, "CPU", {**config, "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": streams * threads})
            compiled = [one] * streams
        else:
            compiled = [core.compile_model(model, "CPU", {**config, "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads}) for _ in range(streams)]
        runners[variant] = compiled

    def run(compiled) -> tuple[float, torch.Tensor]:
        scores = torch.empty(prepared.n_items)
        names = [i.get_any_name() for i in compiled[0].inputs]
        queue = iter(range(len(work)))
        lock = threading.Lock()

        def stream(c) -> None:
            request = c.create_infer_request()
            while True:
                with lock:
                    k = next(queue, None)
                if k is None:
                    return
                rows, inputs = work[k]
                request.infer({n: inputs[n].numpy() for n in names})
                scores[torch.tensor(rows)] = torch.from_numpy(request.get_output_tensor(0).data.copy())

        start = time.perf_counter()
        threads = [threading.Thread(target=stream, args=(c,)) for c in compiled]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start, scores

    rates: dict[str, list[float]] = {v: [] for v in runners}
    scores: dict[str, torch.Tensor] = {}
    names = list(runners)
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for variant in names if rnd % 2 == 0 else names[::-1]:
            seconds, scores[variant] = run(runners[variant])
            if rnd:
                rates[variant].append(prepared.n_items / seconds)
    print(f"{prepared.n_items} documents, {len(work)} batches under {args.budget} tokens, {args.rounds} mirrored rounds")
    print("| variant | pairs/s (rounds) | max abs diff vs torch fp32 (logit) | Spearman vs torch fp32 |")
    print("| --- | ---: | ---: | ---: |")
    for v in names:
        r = rates[v]
        diff = (scores[v] - reference).abs().max().item()
        print(f"| {v} | {statistics.median(r):.1f} ({', '.join(f'{x:.1f}' for x in r)}) | {diff:.4f} | {spearman(scores[v], reference):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
