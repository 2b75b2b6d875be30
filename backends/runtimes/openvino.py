"""OpenVINO on the CPU: the ONNX export converted to OpenVINO IR once (cached), compiled at load.

OpenVINO runs in bfloat16 where the CPU has native bf16 (avx512_bf16 / AMX) and the model's dtype asks
for it, float32 otherwise. Its CPU plugin runs `streams` requests in parallel, each on its share of the
cores; every engine stream (a Python thread) gets its own infer request, since one request is not
thread-safe.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from backends.runtimes.base import Runtime, feeds

IR_FILE = "model.xml"
_PRECISION_HINT = {"bfloat16": "bf16", "float32": "f32"}


def convert_ir(onnx_folder: Path, folder: Path) -> None:
    import openvino as ov

    from backends.runtimes.onnx import MODEL_FILE

    model = ov.convert_model(str(onnx_folder / MODEL_FILE))
    # Weights stay float32 in the IR: the inference precision is chosen when compiling.
    ov.save_model(model, str(folder / IR_FILE), compress_to_fp16=False)


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, folder: Path, *, precision: str, streams: int, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(folder / IR_FILE))
        config = {
            "INFERENCE_PRECISION_HINT": _PRECISION_HINT.get(precision, "f32"),
            "NUM_STREAMS": streams,
            "INFERENCE_NUM_THREADS": streams * threads,
            # Other processes share the cores: pinned threads would queue behind them.
            "ENABLE_CPU_PINNING": False,
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.precision = precision if precision in _PRECISION_HINT else "float32"
        self.weights_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".bin", ".xml"))
        self._local = threading.local()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer(feeds(inputs, self.input_names))
        # The output buffer belongs to the request and is overwritten by its next call: copy it out.
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
