"""`python -m simulated_device serve --registry ...` (bench/ on the path): the gateway's own CLI (ops.cli)
with the cross-encoder's forward replaced by a simulated fast device (bench.fast_device says why), the
engine's rules that follow where the forward runs taken as on a GPU (engine.scheduler.forward_on_host), and
batches timed by their device time, as CUDA events time them, so that the measured rate bounds bulk batches
by time while searches arrive, as on a GPU (engine.scheduler.device_timed).

From the environment: SIMULATED_DEVICE_TOKENS_PER_S (padded tokens a second), SIMULATED_DEVICE_LAUNCH_MS
(host time under the GIL a batch) and SIMULATED_DEVICE_FLOOR_MS (device time a batch costs whatever its
size, default 0: on a GPU a small batch's hundreds of kernels each take microseconds however few tokens
they compute, so a batch's time is about floor + tokens / rate). Standard library only at import, so that another checkout's gateway
(bench.fast_device --baseline) can run under it: that checkout's ops.cli comes first on the path.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

RATE_ENV = "SIMULATED_DEVICE_TOKENS_PER_S"
LAUNCH_ENV = "SIMULATED_DEVICE_LAUNCH_MS"
FLOOR_ENV = "SIMULATED_DEVICE_FLOOR_MS"
# A file that gets a line per batch: thread, launch start, device start, device end, thread resumed, padded tokens.
TRACE = open(os.environ["SIMULATED_DEVICE_TRACE"], "a") if os.environ.get("SIMULATED_DEVICE_TRACE") else None
# Device seconds of the batches an inference thread ran since its timer started (patch_timer).
_DEVICE_S = threading.local()


class SimulatedDevice:
    """One device shared by the inference threads, FIFO: a batch runs after the one before it, for floor +
    padded tokens / rate seconds, and its thread waits for it without the GIL."""

    def __init__(self, tokens_per_s: float, launch_s: float, floor_s: float = 0.0) -> None:
        self.tokens_per_s = tokens_per_s
        self.launch_s = launch_s
        self.floor_s = floor_s
        self._lock = threading.Lock()
        self._free_at = 0.0

    def run(self, padded_tokens: int) -> None:
        t0 = time.perf_counter()
        end = t0 + self.launch_s
        while time.perf_counter() < end:  # the launches: Python under the GIL, let go between bytecodes as eager ops do
            pass
        with self._lock:
            start = max(self._free_at, time.perf_counter())
            self._free_at = done = start + self.floor_s + padded_tokens / self.tokens_per_s
        _DEVICE_S.seconds = getattr(_DEVICE_S, "seconds", 0.0) + (done - start)
        time.sleep(max(0.0, done - time.perf_counter()))
        if TRACE:
            TRACE.write(f"{threading.get_ident() % 1000} {t0:.6f} {start:.6f} {done:.6f} {time.perf_counter():.6f} {padded_tokens}\n")
            TRACE.flush()


def patch_forward(device: SimulatedDevice) -> None:
    """The cross-encoder's forward goes to the device: a padded batch costs its rows x width, a packed one
    (padding_free) its real tokens, as on a GPU. Each pair's score is its length."""
    from backends.flag import FlagBackend

    def forward(self: Any, batch: Any) -> Any:
        inputs = batch.inputs
        if "cu_seq_lens" in inputs:  # packed: one row, pairs at cumulative offsets
            cu = inputs["cu_seq_lens"]
            device.run(int(cu[-1]))
            return (cu[1:] - cu[:-1]).float()
        mask = inputs["attention_mask"]
        device.run(int(mask.numel()))
        return mask.sum(1).float()

    FlagBackend.forward = forward  # type: ignore[method-assign]


def patch_timer() -> None:
    """A batch's seconds are its time on the device, as CUDA events on its stream measure them on a GPU: not
    its launch, nor its wait behind the other thread's batch (the host's clock around the call counts both)."""
    from engine.device import DeviceTimer

    start, seconds = DeviceTimer.start, DeviceTimer.seconds

    def device_start(self: Any) -> None:
        if self._t0 is None:  # only the first start counts (a batch split after an OOM is timed whole)
            _DEVICE_S.seconds = 0.0
        start(self)

    def device_seconds(self: Any) -> float:
        return getattr(_DEVICE_S, "seconds", 0.0) if self._t0 is not None else seconds(self)

    DeviceTimer.start, DeviceTimer.seconds = device_start, device_seconds  # type: ignore[method-assign]


def take_gpu_policies() -> None:
    """What the engine decides by the device, decided as for a GPU (engine.scheduler.forward_on_host: the
    forward is not on the host's cores; device_timed: batches are timed by the device, so the measured rate
    bounds bulk batches by time while searches arrive). A checkout older than these facts keeps its own
    rules, or takes the one rule it had (streams_slices)."""
    import engine.scheduler

    if hasattr(engine.scheduler, "device_timed"):
        engine.scheduler.device_timed = lambda backend: True
    if hasattr(engine.scheduler, "forward_on_host"):
        engine.scheduler.forward_on_host = lambda backend: False
    elif hasattr(engine.scheduler, "streams_slices"):
        engine.scheduler.streams_slices = lambda backend: True


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as ops.cli sets it before torch is imported
    device = SimulatedDevice(
        float(os.environ[RATE_ENV]), float(os.environ[LAUNCH_ENV]) / 1000, float(os.environ.get(FLOOR_ENV) or 0) / 1000
    )
    patch_forward(device)
    patch_timer()
    take_gpu_policies()
    from ops.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
