"""`python -m simulated_device serve --registry ...` (bench/ on the path): the gateway's own CLI (ops.cli)
with the cross-encoder's forward replaced by a simulated fast device (bench.fast_device says why), and
the engine's rules that follow where the forward runs taken as on a GPU (engine.scheduler.forward_on_host;
not the time bound on bulk batches beside searches, which needs a CUDA device's measured rate).

From the environment: SIMULATED_DEVICE_TOKENS_PER_S (padded tokens a second) and SIMULATED_DEVICE_LAUNCH_MS
(host time under the GIL a batch). Standard library only at import, so that another checkout's gateway
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
# A file that gets a line per batch: thread, launch start, device start, device end, thread resumed, padded tokens.
TRACE = open(os.environ["SIMULATED_DEVICE_TRACE"], "a") if os.environ.get("SIMULATED_DEVICE_TRACE") else None


class SimulatedDevice:
    """One device shared by the inference threads, FIFO: a batch runs after the one before it, for padded
    tokens / rate seconds, and its thread waits for it without the GIL."""

    def __init__(self, tokens_per_s: float, launch_s: float) -> None:
        self.tokens_per_s = tokens_per_s
        self.launch_s = launch_s
        self._lock = threading.Lock()
        self._free_at = 0.0

    def run(self, padded_tokens: int) -> None:
        t0 = time.perf_counter()
        end = t0 + self.launch_s
        while time.perf_counter() < end:  # the launches: Python under the GIL, let go between bytecodes as eager ops do
            pass
        with self._lock:
            start = max(self._free_at, time.perf_counter())
            self._free_at = done = start + padded_tokens / self.tokens_per_s
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


def take_gpu_policies() -> None:
    """What the engine decides by the device, decided as for a GPU (engine.scheduler.forward_on_host: the
    forward is not on the host's cores). A checkout older than that fact keeps its own rules, or takes the
    one rule it had (streams_slices)."""
    import engine.scheduler

    if hasattr(engine.scheduler, "forward_on_host"):
        engine.scheduler.forward_on_host = lambda backend: False
    elif hasattr(engine.scheduler, "streams_slices"):
        engine.scheduler.streams_slices = lambda backend: True


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as ops.cli sets it before torch is imported
    patch_forward(SimulatedDevice(float(os.environ[RATE_ENV]), float(os.environ[LAUNCH_ENV]) / 1000))
    take_gpu_policies()
    from ops.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
