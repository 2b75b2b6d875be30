"""A sentence-transformers CrossEncoder on one backend, as a worker process of bench/runtime_bench.py.

Runs inside the benchmark's own venv (bench/runtime_bench.py makes it): sentence-transformers' ONNX and
OpenVINO backends need optimum-onnx / optimum-intel, which pin transformers below 4.58, and the project
runs on transformers 5. Imports nothing of the project but bench.workload (plain Python).

    python -m bench.st_worker SYSTEM MODEL_DIR     # then one JSON command per line on stdin

Systems: torch-bf16 (batch 8), onnx-int8 (ONNX Runtime dynamic int8, avx512_vnni config, batch 32),
openvino (batch 32), onnx (fp32, batch 32); each sorted (documents sorted by length before predict) or not.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.workload import big_request, vocabulary

BATCH = {"torch-bf16": 8, "onnx": 32, "onnx-int8": 32, "openvino": 32}
INT8_FILE = "onnx/model_qint8_avx512_vnni.onnx"


def load(system: str, model_dir: str, work_dir: Path):
    import torch
    from sentence_transformers import CrossEncoder

    if system == "torch-bf16":
        return CrossEncoder(model_dir, device="cpu", max_length=512, model_kwargs={"torch_dtype": torch.bfloat16})
    # The exporters write next to the model: work on a copy of this worker's own (sorted and unsorted
    # workers of one backend start at once).
    local = work_dir / f"st-{system}-{os.getpid()}"
    if not local.exists():
        shutil.copytree(model_dir, local)
    if system == "onnx":
        return CrossEncoder(str(local), device="cpu", max_length=512, backend="onnx")
    if system == "onnx-int8":
        if not (local / INT8_FILE).exists():
            from sentence_transformers import export_dynamic_quantized_onnx_model

            export_dynamic_quantized_onnx_model(CrossEncoder(str(local), backend="onnx"), "avx512_vnni", str(local))
        return CrossEncoder(str(local), device="cpu", max_length=512, backend="onnx", model_kwargs={"file_name": INT8_FILE})
    if system == "openvino":
        return CrossEncoder(str(local), device="cpu", max_length=512, backend="openvino")
    raise SystemExit(f"unknown system {system}")


def main() -> None:
    system, model_dir, work_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    model = load(system, model_dir, work_dir)
    words = vocabulary(model_dir)
    import sentence_transformers
    import transformers

    label = f"sentence-transformers {sentence_transformers.__version__} CrossEncoder, {system}, batch {BATCH[system]}"
    out.write(json.dumps({"ready": True, "label": label, "transformers": transformers.__version__}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        req = big_request(words, cmd["docs"])
        pairs = [(req.query, d) for d in req.documents]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1])) if cmd.get("sorted") else list(range(len(pairs)))
        start = time.perf_counter()
        scores = model.predict([pairs[i] for i in order], batch_size=BATCH[system], show_progress_bar=False)
        seconds = time.perf_counter() - start
        back = [0.0] * len(pairs)
        for k, i in enumerate(order):
            back[i] = float(scores[k])
        out.write(json.dumps({"seconds": seconds, "pairs": len(pairs), "scores": back}) + "\n")


if __name__ == "__main__":
    main()
