"""On a GPU, a bulk request's batches are bounded by device time while searches arrive.

A batch cannot be interrupted, so a search that arrives waits for the batch in flight and the one launched
behind it (two host threads share the model's CUDA stream). On a GPU the scheduler therefore cuts a bulk
request's batches, while searches keep arriving, to SEARCH_BATCH_S of device time at the measured rate
(engine.scheduler.bulk_run_budget); on a CPU, whose token budget is already small, to a share of the budget.

No GPU here: the gateway runs under bench/simulated_device.py, the gateway's own CLI with the tiny
cross-encoder's forward replaced by one FIFO device of a fixed rate (a padded batch costs its rows x width),
the engine's rules taken as on a GPU, and batches timed by their device time as CUDA events time them. The
device's seconds are computed from the tokens, not measured, so what is asserted does not depend on this
machine's speed. Each batch the device ran is read from the simulated device's trace.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench import http_load
from bench.fast_device import SIM_DIR, registry
from bench.simulated_device import LAUNCH_ENV, RATE_ENV
from bench.workload import big_request, small_requests, vocabulary
from engine.scheduler import SEARCH_BATCH_S, SEARCH_RECENT_S
from tests.tiny_models import build_minilm_tiny_cross_encoder

RATE = 200_000  # padded tokens a second: a device the host outruns, so the batches' sizes are the scheduler's
BUDGET_S = 16384 / RATE  # a full batch: 82 ms of device


def _device_seconds(trace: Path) -> list[float]:
    """Each batch's time on the device (trace lines: thread, launch, device start, device end, resumed, tokens)."""
    return [float(f[3]) - float(f[2]) for f in (line.split() for line in trace.read_text().splitlines())]


def test_bulk_batches_beside_searches_take_at_most_search_batch_s_of_the_device(tmp_path: Path) -> None:
    model = build_minilm_tiny_cross_encoder(tmp_path / "tiny-ce")
    words = vocabulary(model)
    big, threes = big_request(words, 1500), small_requests(words, 200, 3)
    trace = tmp_path / "device-trace.txt"
    gw = http_load.GatewayProcess(
        registry(model, "padded"), tmp_path, module="simulated_device",
        env={RATE_ENV: str(RATE), LAUNCH_ENV: "1", "SIMULATED_DEVICE_TRACE": str(trace), "PYTHONPATH": os.pathsep.join([str(http_load.ROOT), str(SIM_DIR)])},
    )
    try:
        gw.wait_ready()
        trace.write_text("")  # the warm-up's batches
        alone = http_load.big(gw.base, "sim", big)
        full = _device_seconds(trace)
        http_load.sequential(gw.base, "sim", threes[:20])
        time.sleep(SEARCH_RECENT_S + 0.5)  # no search in the last second: the big request starts with full batches
        trace.write_text("")
        beside = http_load.beside_big(gw.base, "sim", big, threes)
        cut = _device_seconds(trace)
    finally:
        gw.close()
    print(f"alone: {len(full)} batches, median {sorted(full)[len(full) // 2] * 1000:.1f} ms, request {alone['seconds']:.2f} s; "
          f"beside {beside['requests']} searches (p99 {beside['p99_s'] * 1000:.0f} ms): {len(cut)} batches, "
          f"longest {max(cut) * 1000:.1f} ms, request {beside['big_seconds']:.2f} s")
    # Alone, the big request's batches fill the token budget: most hold the device for over half of 82 ms.
    assert sorted(full)[len(full) // 2] > BUDGET_S / 2
    assert beside["requests"] >= 5
    # Beside searches, only the batches launched before the first search (50 ms after the big request was
    # sent) are full. Every later one holds the device at most SEARCH_BATCH_S (the rate is measured, so a
    # little over), where the CPU's rule (a quarter of the budget) would give 20 ms.
    long = [s for s in cut if s > 1.5 * SEARCH_BATCH_S]
    assert len(long) <= 3, sorted(cut)[-6:]
