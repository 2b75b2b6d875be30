"""GPU hygiene, in one place.

- One CUDA stream per scheduler: a model's batches queue on their own stream, so one model's kernels do
  not serialise behind another's on the default stream.
- Host-to-device copies come from pinned memory with non_blocking (Backend.collate builds pinned tensors).
- Compute time comes from CUDA events recorded on that stream: the host returns from `forward` once the
  kernels are launched, so wall time there measures launch, not compute.
- The device sync is an event's synchronize() inside the guarded batch step (CUDA reports a kernel's error
  at the next sync, not in the call that launched it), and never under the scheduler's lock, which the
  event loop waits on. The events are blocking: with one CUDA context and many cores, CUDA's default is to
  spin while it waits, and each inference thread would then hold a core the tokenizers need for the whole
  batch (the host is the bottleneck there: docs/gpu.md). Waking costs microseconds against batches of
  milliseconds.
- A device gate: every batch on a CUDA device holds it shared; a warm-up holds it exclusively, so the
  allocator's peak counters (device-wide, shared by every model of the process) see this model alone.
On a CPU all of this reduces to wall-clock timing and no-ops, and one thing of its own: inference threads
run at a lower CPU priority (core.host.CPU_STREAM_NICE; OpenMP helpers they start inherit it), so the event
loop and the tokenizer lane of small requests, which need little CPU but need it at once, are not queued
behind batches: the cores stay fully used, a search's parsing and tokenizing go first, and /ready answers
under saturation.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import torch

from core.host import CPU_STREAM_NICE, lower_cpu_priority


class DeviceTimer:
    """Compute time of the work between start() and stop(); read it after synchronize(). Only the first
    start() counts: a batch split after an OOM is timed from its first launch to its last."""

    __slots__ = ("_cuda", "_start", "_end", "_t0", "_t1")

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._start = self._end = None
        self._t0: float | None = None
        self._t1 = 0.0

    def start(self) -> None:
        if self._t0 is not None:
            return
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True, blocking=True)
            self._start.record()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._end = torch.cuda.Event(enable_timing=True, blocking=True)
            self._end.record()
        self._t1 = time.perf_counter()

    def synchronize(self) -> None:
        """Wait for the work recorded before stop(): the one device sync of a batch."""
        if self._end is not None:
            self._end.synchronize()

    def seconds(self) -> float:
        if self._start is not None and self._end is not None:
            return self._start.elapsed_time(self._end) / 1000.0
        return max(self._t1 - self._t0, 0.0) if self._t0 is not None else 0.0


class StreamContext:
    """The per-scheduler CUDA stream (None on a CPU), entered once by each inference thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        if self.stream is None:
            if self.device.type == "cpu":
                lower_cpu_priority(CPU_STREAM_NICE)
            yield
            return
        # Weights were loaded on the default stream: this stream starts after that work.
        self.stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield


class _DeviceGate:
    """A readers-writer lock per device: batches share it, a peak measurement holds it alone."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._readers: dict[str, int] = {}
        self._writer: dict[str, bool] = {}

    @contextlib.contextmanager
    def shared(self, device: torch.device) -> Iterator[None]:
        with self._held(device, exclusive=False):
            yield

    @contextlib.contextmanager
    def exclusive(self, device: torch.device) -> Iterator[None]:
        with self._held(device, exclusive=True):
            yield

    @contextlib.contextmanager
    def _held(self, device: torch.device, exclusive: bool) -> Iterator[None]:
        if device.type != "cuda":
            yield
            return
        key = str(device)
        with self._cv:
            while self._writer.get(key):
                self._cv.wait()
            if exclusive:
                self._writer[key] = True  # new batches wait from here on
                while self._readers.get(key, 0):
                    self._cv.wait()
            else:
                self._readers[key] = self._readers.get(key, 0) + 1
        try:
            yield
        finally:
            with self._cv:
                if exclusive:
                    self._writer[key] = False
                else:
                    self._readers[key] -= 1
                self._cv.notify_all()


DEVICE_GATE = _DeviceGate()


class PeakMeter:
    """This model's own peak device memory over a piece of work, measured in the calling (inference) thread.

    Why this way: torch's allocator counters are per device and process-wide, so a batch of another model
    running meanwhile would land in our peak. Holding the device gate exclusively stops other models'
    batches for the measurement (a warm-up batch, once at load), and the counters' deltas are then ours.
    Measuring in the inference thread itself, on its stream, puts the thread's cuBLAS workspace (one per
    thread and stream, allocated on first use and never freed) inside the measurement.
    On a CPU there is no allocator counter to read: `measured` stays False and the bytes 0.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.measured = device.type == "cuda"
        self.base = self.peak = self.after = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator["PeakMeter"]:
        if not self.measured:
            yield self
            return
        with DEVICE_GATE.exclusive(self.device):
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield self
            finally:
                torch.cuda.synchronize(self.device)
                self.peak = torch.cuda.max_memory_allocated(self.device)
                self.after = torch.cuda.memory_allocated(self.device)


def free_cached(device: torch.device) -> None:
    """Give the allocator's cached blocks back after an OOM, so the retry can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
