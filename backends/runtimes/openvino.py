"""OpenVINO on the CPU: the scoring module converted to OpenVINO IR once (cached), compiled at load.

The IR comes from OpenVINO's PyTorch frontend, not from the ONNX export: torch's attention reaches ONNX
as MatMul/Softmax/Select, while the PyTorch frontend keeps it one ScaledDotProductAttention op, which the
CPU plugin fuses (1.12x the pairs/s of the ONNX-converted IR on the benchmark's 1,000 documents, Intel
Xeon with AMX, README "Speed").

OpenVINO computes in bfloat16 where the CPU has native bf16 (avx512_bf16 / AMX) and the model's dtype
asks for it, float32 otherwise. `quantization: int8` is NNCF's weight-only int8 (asymmetric, one scale
per output channel) of that IR: weights are stored in int8 and decompressed in the kernel, activations
stay in the compute precision. Static int8 (activations too, AMX-INT8) measured only 1.1-1.2x bf16 here
and ranked the benchmark's documents at Spearman 0.84-0.94 against float32, below the 0.99 wanted
(bench/openvino_options.py).

The CPU plugin runs `streams` requests in parallel, each on its share of the cores; every engine stream
(a Python thread) gets its own infer request, since one request is not thread-safe.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

from backends.runtimes.base import Positional, Runtime, feeds
from core.host import cpu_model_name

IR_FILE = "model.xml"
_PRECISION_HINT = {"bfloat16": "bf16", "float32": "f32"}


def convert_ir(module: torch.nn.Module, sample: dict[str, torch.Tensor], folder: Path) -> None:
    """Write `module` (float32, on the CPU) as folder/model.xml with dynamic batch and sequence axes."""
    import openvino as ov

    names = list(sample)
    wrapper = Positional(module, names).eval()
    example = tuple(sample[n].cpu() for n in names)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python branch on a shape; the IR is verified after it is loaded.
        warnings.simplefilter("ignore")
        model = ov.convert_model(
            wrapper, example_input=example, input=[(ov.PartialShape([-1, -1]), ov.Type(t.numpy().dtype)) for t in example]
        )
    module.eval()
    # The graph's inputs get the collated batch's names (feeds() matches on them).
    for port, name in zip(model.inputs, names):
        port.get_tensor().set_names({name})
    # Weights stay float32 in the IR: the inference precision is chosen when compiling.
    ov.save_model(model, str(folder / IR_FILE), compress_to_fp16=False)


def compress_int8(source: Path, folder: Path) -> None:
    """NNCF weight-only int8 of source/model.xml into folder/model.xml."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(source / IR_FILE))
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(folder / IR_FILE), compress_to_fp16=False)


# A compile that crashes the process cannot be caught: each IR and compute precision is first compiled and
# run once in a child process on this CPU (the result is kept beside the IR).
SURVIVAL_TIMEOUT_S = 600


def survives(folder: Path, compute: str, sample: dict[str, torch.Tensor]) -> str | None:
    """None when folder's IR compiles and runs in `compute` precision in a child process, else why not.

    OpenVINO's CPU plugin can die in native code: a GTE model compiled in bf16 on an Intel Xeon with AMX
    (OpenVINO 2026.4) raised SIGFPE, which ended the whole gateway at load. In a child process the same
    crash only rules the runtime out for that model (`auto` picks another one)."""
    # The verdict holds for this CPU and for the native code loaded beside OpenVINO: a library preloaded
    # later (jemalloc, as operators do against heap growth) aborted its CPU plugin on an AMD EPYC, and a
    # verdict kept from before it would have let that crash end the gateway at every start.
    native = f"{cpu_model_name()}\0{os.environ.get('LD_PRELOAD', '')}"
    marker = folder / f"survives-{compute}-{hashlib.sha256(native.encode()).hexdigest()[:12]}"
    if marker.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        feed = Path(tmp) / "sample.npz"
        np.savez(feed, **{k: v.cpu().numpy() for k, v in sample.items()})
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "backends.runtimes.openvino", str(folder), compute, str(feed)],
                capture_output=True, text=True, timeout=SURVIVAL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return f"compiling it in {compute} did not finish in {SURVIVAL_TIMEOUT_S} s"
    if proc.returncode == 0:
        marker.touch()
        return None
    if proc.returncode < 0:
        return f"OpenVINO's CPU plugin crashed ({signal.Signals(-proc.returncode).name}) compiling or running it in {compute}"
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return f"compiling it in {compute} failed in a child process: {last}"


class _Lease:
    """A thread's hold on a compiled model: freed (and the model handed back) when the thread ends."""


class OpenVinoRuntime(Runtime):
    name = "openvino"
    # The CPU plugin prepares each new input shape (shape inference, memory) and keeps a cache of them, and
    # the engine's batches come in every width. Rounded up to 16 tokens, the tiny cross-encoder on 500
    # batches of 8-20 x 60-200 tokens cost 1.96-2.07 us of CPU a real token against 2.27-2.72 unrounded
    # (3 rounds, 2-core Intel Xeon; 8: 2.09-2.18, 32: 2.09-2.30). ONNX Runtime gained nothing (3.05-3.20
    # unrounded, 3.14-3.29 at 16), so it stays at 1. Through the gateway (bench.host_path's workloads, 6 paired
    # rounds, same machine): 16 x 20 documents 0.97-1.17x the pairs/s (median 1.12), 1,000 documents 0.97-1.30x.
    width_multiple = 16

    def __init__(self, folder: Path, *, precision: str, compute: str, streams: int, threads: int) -> None:
        """precision: what the weights are stored in ("int8", or the compute precision); compute: the
        precision the math runs in ("bfloat16" or "float32")."""
        import openvino as ov

        self._core = ov.Core()
        self._model = self._core.read_model(str(folder / IR_FILE))
        self.compute = compute if compute in _PRECISION_HINT else "float32"
        self.precision = "int8" if precision == "int8" else self.compute
        self._threads = threads
        # OpenVINO 2026.4 computes wrong scores for a weight-compressed model compiled with NUM_STREAMS > 1
        # (Spearman -1 to 0.2 against float32 on the benchmark; the parity check catches it): there, each engine
        # stream compiles a one-stream copy of its own. Other precisions share one multi-stream compile.
        self._per_stream = self.precision == "int8"
        self.compiled = self._compile(1 if self._per_stream else streams)
        self._spare = [self.compiled] if self._per_stream else []
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self._lock = threading.Lock()
        self.weights_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".bin", ".xml"))
        self._local = threading.local()

    def _compile(self, streams: int):
        config = {
            "INFERENCE_PRECISION_HINT": _PRECISION_HINT[self.compute],
            "NUM_STREAMS": streams,
            "INFERENCE_NUM_THREADS": streams * self._threads,
            # Other processes share the cores: pinned threads would queue behind them.
            "ENABLE_CPU_PINNING": False,
        }
        return self._core.compile_model(self._model, "CPU", config)

    def describe(self) -> str:
        if self.precision == "int8":
            return f"openvino (int8 weights, {self.compute} compute)"
        return super().describe()

    def _request(self):
        request = getattr(self._local, "request", None)
        if request is not None:
            return request
        compiled = self.compiled
        if self._per_stream:
            with self._lock:
                compiled = self._spare.pop() if self._spare else None
            if compiled is None:
                compiled = self._compile(1)
            lease = self._local.lease = _Lease()
            weakref.finalize(lease, self._spare.append, compiled)
        request = self._local.request = compiled.create_infer_request()
        return request

    def release_thread(self) -> None:
        # The thread's infer request, and its lease: a per-stream compiled copy goes back to the spares.
        self._local.__dict__.clear()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        request = self._request()
        request.infer(feeds(inputs, self.input_names))
        # The output buffer belongs to the request and is overwritten by its next call: copy it out.
        return torch.from_numpy(request.get_output_tensor(0).data.copy())


if __name__ == "__main__":  # the child of survives(): compile folder's IR in a precision and run the sample
    _folder, _compute, _feed = Path(sys.argv[1]), sys.argv[2], np.load(sys.argv[3])
    _runtime = OpenVinoRuntime(_folder, precision=_compute, compute=_compute, streams=1, threads=1)
    _runtime({k: torch.from_numpy(_feed[k]) for k in _feed.files})
