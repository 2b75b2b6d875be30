"""Where an inference thread's time goes in one batch, step by step: wall seconds and thread-CPU seconds.

On a fast GPU the device waits while the host builds, collates and answers batches. /metrics reports each
step's totals (`rerank_batch_step_seconds`, `rerank_batch_step_cpu_seconds`, by model and step), so a
host-bound device shows which step bounds it; `bench.http_load.costed` reads them per batch. Wall time
holds a step's waits (the GIL, a thread that preempted it, the device sync); CPU time is the thread's own
work, so the two apart tell a busy host from a contended one. A runtime that computes on threads of its
own (OpenVINO's, a multi-threaded ONNX Runtime's) leaves its forward's work out of the CPU time: there the
forward's wall time is its compute (`make serve`'s MiniLM on this 2-core machine: 13.8 ms wall, 1.2 ms CPU).

Steps: `build` (the batch from the window, under the scheduler's lock), `wait_launch` (on a GPU, for the
other inference thread's collation and launch on the shared CUDA stream) and engine.inference.STEPS. Two
clock reads a step boundary and two counters a step: 17-21 us a batch on a 2-core AMD EPYC, measured alone,
where the CPU proxy's batch takes ~4 ms and a GPU batch at 16k tokens holds ~125 pairs.

Under load the CPU read costs more. `time.thread_time` is a system call (perf_counter is not), and it keeps
the GIL. Under bench.host_path's 16 clients on those 2 cores (ONNX Runtime), it averaged 30 us a call: p50
1.8 us, p99 ~1 ms. py-spy (`record --gil`) found 12% of the GIL-held samples in it. Two perf_counter reads
at the same place took 0.45 us (p99 1.1 us). Most likely the kernel preempts the nice-10 inference thread on
the way out of the call, and the thread keeps the GIL while it waits. Without the CPU reads, 16 clients ran
0.94-1.05x in 4 paired rounds, so nothing measurable is lost and they stay.
"""

from __future__ import annotations

import time


class StepClock:
    """Times consecutive steps on one thread: each `mark(step)` ends the step before it and starts `step`;
    a step marked again (an OOM retry's collate and forward) adds up."""

    __slots__ = ("_step", "_wall", "_cpu", "spent")

    def __init__(self, first: str | None) -> None:
        self.spent: dict[str, list[float]] = {}  # step -> [wall seconds, CPU seconds]
        self._step: str | None = first
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def mark(self, step: str | None) -> None:
        """End the current step; start `step` (None: stop)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        if self._step is not None:
            spent = self.spent.get(self._step)
            if spent is None:
                spent = self.spent[self._step] = [0.0, 0.0]
            spent[0] += wall - self._wall
            spent[1] += cpu - self._cpu
        self._step, self._wall, self._cpu = step, wall, cpu
