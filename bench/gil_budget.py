"""Where the GIL goes, a request and a pair: the gateway under py-spy's GIL sampler.

On a GPU host the cores are many and the device is fast. What does not spread over the cores is the Python
that holds the GIL: the event loop (HTTP, the app), the Python part of tokenizing, and the inference
threads' batch building, collation, kernel launches and answers. However fast the device and however many
the cores, one process serves at most 1 / (GIL seconds a pair) pairs a second, so the GIL-held time a pair
and a request is the host's budget on a GPU, and what it is spent on says what to cut first.

py-spy (`py-spy record --gil`, in the test extra; it needs ptrace rights over the gateway, as root has) samples
the thread that holds the GIL, RATE times a second. Each sample's stack says what that thread does:
- an inference thread: its batch's step (engine.inference.STEPS and `build`); `forward` is the launches,
  which the simulated device holds the GIL for (bench.fast_device's LAUNCH_MS a batch, as an eager
  24-layer encoder's ~500 kernel launches would);
- a tokenizer thread: the Python part of tokenizing (the Rust encoder lets the GIL go);
- the event loop: the HTTP server (uvicorn and h11), the framework (Litestar), asyncio's own machinery,
  and the rest of what the app runs there (handlers, dialects, pipeline, admission, metrics, logs);
- any other thread, by its name (the usage ledger's).
GIL seconds are samples / RATE: the sampler's rate holds while the gateway's threads are few (a thread
spinning under the GIL alone: 396 samples in 2 s at 200 a second).

Workloads, as bench.host_path's: `c16`, 16 closed-loop clients x 20-document requests, and `big`, one
1,000-document request BIG_REPEATS times in a row. Devices: `packed` / `padded`, the simulated device of
bench.fast_device (1,150,000 tokens a second: the GPU regime, where the forward costs the host only its
launches); `proxy`, the CPU proxy of bench.host_path (the tiny model's forward on the CPU, `--runtime`).

    python -m bench.gil_budget                       # simulated packed device; ~25 s on 2 cores
    python -m bench.gil_budget --device proxy --runtime onnxruntime
    python -m bench.gil_budget --requests 48 --json out.json   # a smoke run (tests/test_bench_smoke.py)
"""

from __future__ import annotations

import argparse
import collections
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from bench import http_load
from bench.report import run_and_report
from engine.scheduler import SEARCH_RECENT_S

RATE = 250  # samples a second
RATE_TOKENS_PER_S = 1_150_000  # the simulated device's, as bench.fast_device's default case
# The big request this many times in a row: one takes ~0.2 s here, too few samples alone.
BIG_REPEATS = 8
# py-spy prints its first line as soon as it has attached (here in well under a second). One that prints
# nothing by then is stuck (a ptrace that never returns), and the run it belongs to must go on without it.
ATTACH_TIMEOUT_S = 30.0

# What a sample's thread is doing. py-spy's raw lines (`--threads`) are "thread (id): name" and then the
# stack's frames, "function (file:line)", root first. The thread's name says its job (engine.streams'
# "infer-", engine.lanes' "tok-", the event loop in the main thread). An inference thread's batch step is
# the first of these names in its stack; the event loop's samples go by the file of their innermost frame.
INFERENCE_STEPS = (
    # engine.step_time's clock reads, whichever step they end (time.thread_time is a system call that keeps
    # the GIL).
    ("step clocks", ("StepClock.",)),
    ("build", ("Scheduler._build_batch",)),
    ("collate", ("Plan.rows", ".collate (")),
    ("scatter", ("BatchRunner._scatter",)),
    ("pool", ("BatchRunner._answer",)),
    ("metrics", ("observe_batch", "observe_steps")),
    ("sync", ("synchronize",)),
    ("forward", ("BatchRunner.forward_rows",)),
)
LOOP_FILES = (
    ("HTTP server (uvicorn, h11)", ("uvicorn/", "h11/", "httptools")),
    ("framework (Litestar)", ("litestar/",)),
    ("asyncio", ("asyncio/", "selectors.py")),
)


def category(stack: str) -> str:
    """`thread: job` for one sampled stack (py-spy's raw format with --threads, without the count)."""
    root, _, frames = stack.partition(";")
    name = root.partition("): ")[2]
    if name.startswith("infer-"):
        for step, names in INFERENCE_STEPS:
            if any(n in frames for n in names):
                return f"inference: {step}"
        return "inference: other"
    if name.startswith("tok-"):
        return "tokenizing (Python)"
    if name == "MainThread":
        leaf = frames.rsplit(";", 1)[-1]
        for job, files in LOOP_FILES:
            if any(f in leaf for f in files):
                return f"event loop: {job}"
        return "event loop: app"
    return f"other: {name or 'unnamed'}"


def parse(raw: str) -> collections.Counter[str]:
    """Samples by category from py-spy's raw output ("stack count" a line)."""
    out: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out[category(stack)] += int(count)
    return out


class SamplerUnavailable(RuntimeError):
    """py-spy is not installed, or may not sample the gateway (no ptrace rights over it)."""


def py_spy() -> str | None:
    """py-spy's executable: on PATH, beside this Python, or in the bin/ of a `pip install --target` folder on
    sys.path (as the GPU machine installs .whl/)."""
    found = shutil.which("py-spy")
    if found:
        return found
    for folder in (Path(sys.executable).parent, *(Path(p) / "bin" for p in sys.path if p)):
        if (folder / "py-spy").is_file():
            return str(folder / "py-spy")
    return None


def sampled(
    pid: int, work: Path, name: str, run: Callable[[], dict[str, Any]], rate: int = RATE, *, attach_timeout_s: float = ATTACH_TIMEOUT_S,
) -> tuple[dict[str, Any], collections.Counter[str]]:
    """Run a workload while py-spy samples `pid`'s GIL holder: (the workload's result, samples by category)."""
    spy_bin = py_spy()
    if spy_bin is None:
        raise SamplerUnavailable("py-spy is not installed (the test extra has it)")
    out = work / f"{name}.raw"
    spy = subprocess.Popen(
        [spy_bin, "record", "--gil", "--threads", "--nonblocking", "-r", str(rate), "-f", "raw", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert spy.stdout is not None
    first = _first_line(spy.stdout, attach_timeout_s)  # "Sampling process ... times a second": attached
    if first is None:
        spy.kill()
        spy.wait()
        raise SamplerUnavailable(f"py-spy printed nothing in {attach_timeout_s:g} s (stuck attaching?): not sampled")
    if "Sampling" not in first:
        spy.kill()
        rest = spy.stdout.read()
        spy.wait()
        raise SamplerUnavailable(f"py-spy could not sample the gateway (ptrace rights?): {first}{rest[-500:]}")
    try:
        result = run()
    finally:
        spy.send_signal(signal.SIGINT)
        tail = spy.communicate(timeout=60)[0]
    if not out.exists():
        raise SamplerUnavailable(f"py-spy wrote no samples: {tail[-500:]}")
    return result, parse(out.read_text())


def _first_line(stream: Any, timeout_s: float) -> str | None:
    """The stream's first line, or None if none came within timeout_s (the reader thread ends when the
    stream closes: the caller kills the process that writes it)."""
    box: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: box.put(stream.readline()), name="py-spy-first-line", daemon=True).start()
    try:
        return box.get(timeout=timeout_s)
    except queue.Empty:
        return None


def summary(samples: collections.Counter[str], rate: int, pairs: int, requests: int, seconds: float) -> dict[str, Any]:
    """A workload's GIL time: in all, a request, a pair, the pairs/s it allows, and a pair's by category."""
    gil_s = sum(samples.values()) / rate
    return {
        "pairs": pairs, "requests": requests, "seconds": seconds, "pairs_per_s": pairs / seconds,
        "gil_s": gil_s, "gil_share": gil_s / seconds, "gil_ms_per_request": gil_s / requests * 1e3,
        "gil_us_per_pair": gil_s / pairs * 1e6, "gil_bound_pairs_per_s": pairs / gil_s if gil_s else None,
        "us_per_pair": {k: v / rate / pairs * 1e6 for k, v in samples.most_common()},
    }


def measure(gw: http_load.GatewayProcess, work: Path, rate: int, workloads: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, Any]:
    """Each workload (its result has pairs, requests and seconds) while py-spy samples the GIL's holder."""
    out = {}
    for name, run in workloads.items():
        time.sleep(SEARCH_RECENT_S + 0.5)  # bench.host_path says why
        result, samples = sampled(gw.proc.pid, work, name, run, rate)
        out[name] = summary(samples, rate, result["pairs"], result["requests"], result["seconds"])
    return out


def run(device: str, runtime: str, requests: int, rate: int, work: Path, big_repeats: int = BIG_REPEATS) -> dict[str, Any]:
    # Here, not at the top: bench.gpu_check's section c samples its own gateway with the functions above.
    from bench import fast_device, host_path
    from bench.simulated_device import FLOOR_ENV, LAUNCH_ENV, RATE_ENV
    from bench.workload import big_request, small_requests, vocabulary
    from core.host import cpu_model_name
    from tests.tiny_models import build_minilm_tiny_cross_encoder

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    model_dir = build_minilm_tiny_cross_encoder(work / "tiny-ce")
    words = vocabulary(model_dir)
    small, big = small_requests(words, requests, 20), big_request(words, 1000)
    if device == "proxy":
        model = "plain"
        gw = http_load.GatewayProcess(host_path.registry(model_dir, "float32", runtime), work, name="proxy", module=http_load.serve_module(http_load.ROOT))
    else:
        model = "sim"
        env = {RATE_ENV: str(RATE_TOKENS_PER_S), LAUNCH_ENV: str(fast_device.LAUNCH_MS), FLOOR_ENV: "0"}
        env["PYTHONPATH"] = os.pathsep.join([str(http_load.ROOT), str(fast_device.SIM_DIR)])
        gw = http_load.GatewayProcess(fast_device.registry(model_dir, device), work, name=device, module="simulated_device", env=env)
    out: dict[str, Any] = {
        "machine": cpu_model_name(), "cores": len(os.sched_getaffinity(0)), "device": device, "rate": rate,
        "runtime": runtime if device == "proxy" else f"simulated, {RATE_TOKENS_PER_S} tokens/s, {fast_device.LAUNCH_MS} ms of launch a batch",
    }
    try:
        gw.wait_ready()
        http_load.closed_loop(gw.base, model, small[:32], 16)  # warm the HTTP path
        http_load.big(gw.base, model, big)
        out |= measure(gw, work, rate, {
            "c16": lambda: http_load.closed_loop(gw.base, model, small, 16),
            "big": lambda: host_path.big_repeats(gw, model, big, big_repeats),
        })
    finally:
        gw.close()
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"GIL held, by py-spy at {res['rate']} samples a second; {res['machine']}, {res['cores']} cores; device {res['device']} ({res['runtime']})",
        "",
        "| workload | pairs/s | GIL held, share of wall | GIL ms a request | GIL us a pair | pairs/s the GIL allows |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("c16", "big"):
        w = res[name]
        lines.append(
            f"| {name} | {w['pairs_per_s']:.0f} | {w['gil_share']:.0%} | {w['gil_ms_per_request']:.2f} | {w['gil_us_per_pair']:.1f} | "
            f"{w['gil_bound_pairs_per_s'] or 0:.0f} |"
        )
    cats = sorted({k for name in ("c16", "big") for k in res[name]["us_per_pair"]}, key=lambda k: -res["c16"]["us_per_pair"].get(k, 0.0))
    lines += ["", "GIL us a pair, by what held it:", "", "| held by | c16 | big |", "|---|---|---|"]
    for k in cats:
        lines.append(f"| {k} | {res['c16']['us_per_pair'].get(k, 0.0):.1f} | {res['big']['us_per_pair'].get(k, 0.0):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("packed", "padded", "proxy"), default="packed")
    ap.add_argument("--runtime", default="onnxruntime", help="with --device proxy: the gateway's CPU runtime")
    ap.add_argument("--requests", type=int, default=16 * 40, help="c16's requests in all")
    ap.add_argument("--big-repeats", type=int, default=BIG_REPEATS, help="1,000-document requests in a row (default %(default)s)")
    ap.add_argument("--rate", type=int, default=RATE, help="py-spy's samples a second")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, help="working folder (model, logs, samples); a temporary one by default")
    args = ap.parse_args(argv)
    return run_and_report(lambda work: run(args.device, args.runtime, args.requests, args.rate, work, args.big_repeats), args.work, args.json, markdown)


if __name__ == "__main__":
    sys.exit(main())
