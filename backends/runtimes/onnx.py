"""ONNX export of a backend's scoring module, and ONNX Runtime on the CPU (fp32, or dynamic int8).

The export goes through torch.onnx.export's TorchScript path directly: optimum's exporters pin
transformers below 4.58 (optimum-onnx 0.1) and the project runs on transformers 5, and the scoring module
is a plain function of (input_ids, attention_mask[, token_type_ids]) that needs none of optimum's
model-specific configs. Batch and sequence axes are dynamic.

int8 is ONNX Runtime's dynamic quantization (int8 weights per output channel, activations quantized per
batch, VNNI kernels where the CPU has them), what sentence-transformers' `export_dynamic_quantized_onnx_model`
does with optimum, applied to the same fp32 export.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from backends.runtimes.base import Positional, Runtime, feeds

log = logging.getLogger("rerank_gateway.runtimes")

MODEL_FILE = "model.onnx"
OPSET = 17
# A protobuf holds at most 2 GiB: bigger models keep their tensors in a side file.
EXTERNAL_DATA_BYTES = 1_800_000_000


def export_onnx(module: torch.nn.Module, sample: dict[str, torch.Tensor], folder: Path) -> None:
    """Write `module` (float32, on the CPU) as folder/model.onnx."""
    names = list(sample)
    # eval() on the wrapper too: the exporter restores the top module's training flag afterwards, on
    # the whole tree, and a fresh module's flag is True (dropout on for every later torch call).
    fp32 = Positional(module, names).eval()
    params = sum(p.numel() for p in fp32.parameters())
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic["scores"] = {0: "batch"}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python branch on a shape; the export is verified after it is loaded.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fp32, tuple(sample[n].cpu() for n in names), str(folder / MODEL_FILE),
            dynamo=False, input_names=names, output_names=["scores"], dynamic_axes=dynamic, opset_version=OPSET,
            do_constant_folding=True,
        )
    module.eval()
    if params * 4 > EXTERNAL_DATA_BYTES:
        import onnx

        model = onnx.load(str(folder / MODEL_FILE))
        onnx.save_model(model, str(folder / MODEL_FILE), save_as_external_data=True, location="model.onnx.data")
    del fp32


def quantize_int8(source: Path, folder: Path) -> None:
    """Dynamic int8 quantization of source/model.onnx into folder/model.onnx."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    size = sum(f.stat().st_size for f in source.iterdir() if f.name.startswith(MODEL_FILE))
    quantize_dynamic(
        str(source / MODEL_FILE), str(folder / MODEL_FILE), weight_type=QuantType.QInt8, per_channel=True,
        use_external_data_format=size > EXTERNAL_DATA_BYTES,
    )


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, folder: Path, *, precision: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Each CPU stream calls run() from its own thread with its own share of the cores.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.precision = precision
        self.weights_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(MODEL_FILE))

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, feeds(inputs, self.input_names))[0])
