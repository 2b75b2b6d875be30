"""The benchmark still runs end to end: `python -m bench.rerank_bench --quick` against a real
`rerank-gateway serve` subprocess and the in-process ceiling, on a tiny workload.

FlagReranker and CrossEncoder are left out here: they are the slow part, and `make bench` runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_runs_gateway_and_ceiling(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        # --gateway-runtime torch: with `auto` the gateway exports and times ONNX and OpenVINO copies at load,
        # most of this test's time on a fresh machine; tests/test_runtimes.py covers those on this same model.
        [sys.executable, "-m", "bench.rerank_bench", "--quick", "--systems", "ceiling,gateway", "--gateway-runtime", "torch",
         "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "rerank_bench_quick.json").read_text())
    gateway, ceiling = res["systems"]["gateway"], res["systems"]["ceiling"]
    for system in (gateway, ceiling):
        for workload in ("big", "concurrent"):
            assert system[workload]["pairs_per_s"] > 0
            assert 0 < system[workload]["padding_efficiency"] <= 1
        assert system["peak_rss_mb"] > 100
    # The gateway's padding figure comes from its own /metrics, and it served every request.
    assert gateway["concurrent"]["requests"] == res["workload"]["concurrent"]["requests_gateway_per_round"]
    # Same model, same dtype: the gateway ranks the documents as the plain loop does.
    assert res["score_agreement"]["gateway"]["spearman"] > 0.99
    assert "| target |" in (tmp_path / "out" / "rerank_bench_quick.md").read_text()


def test_event_loop_bench_counts_a_request_s_work(tmp_path: Path) -> None:
    """bench.event_loop runs the real app in-process and counts what a request costs the event loop. (In a
    process of its own: it sets up the root logger as `serve` does.)"""
    out = tmp_path / "el.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.event_loop", "--requests", "20", "--rounds", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["requests"] == 20 and len(res["cpu_ms_per_request"]) == 1 and res["cpu_ms_per_request"][0] > 0
    # A request creates its call's task and its disconnect watcher, and runs a few hundred calls at least.
    assert res["tasks"] >= 2 and res["python_calls"] > 300 and res["loop_callbacks"] > 5


def test_host_path_bench_reports_where_the_server_spends_its_cpu(tmp_path: Path) -> None:
    """bench.host_path, the issue's CPU proxy (the gateway against an in-process loop on a tiny model): every
    workload runs and its markdown carries the ratios, the CPU split by thread and a batch's steps."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "hp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.host_path", "--rounds", "1", "--quick", "--json", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rounds"]
    assert row["loop_pairs_per_s"] > 0 and row["big"]["pairs"] == 3 * 200
    for workload in ("big", "c16_plain", "c16_b16k", "one_doc"):
        server = row[workload]["server"]
        assert server["cpu_ms_per_pair"] > 0 and server["step_ms_per_batch"]["forward"][1] > 0
    for line in ("| 1 |", "| c16_plain |", "A batch's steps on its inference thread", "big / loop: median"):
        assert line in proc.stdout, line


def test_fast_device_bench_runs_the_gateway_before_a_simulated_device(tmp_path: Path) -> None:
    """bench.fast_device serves the tiny cross-encoder with its forward replaced by a simulated device in the
    gateway process: the device's busy share comes from the batches' tokens, a packed batch costs its real
    tokens, a big request of more than SMALL_REQUEST_DOCS documents is sliced, and 3-document requests are timed
    alone and beside a big one."""
    out = tmp_path / "fd.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fast_device", "--cases", "packed:400000,padded:400000", "--rounds", "1", "--docs", "300",
         "--small-requests", "32", "--beside-docs", "600", "--json", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    packed, padded = res["cases"]["packed:400000"]["gateway"][0], res["cases"]["padded:400000"]["gateway"][0]
    for row in (packed, padded):
        for workload in ("big", "c16"):
            assert row[workload]["pairs_per_s"] > 0 and 0 < row[workload]["server"]["device_busy"] <= 1.05
    assert packed["big"]["server"]["padding"] == packed["c16"]["server"]["padding"] == 1.0
    # A batch's steps on its inference thread: the simulated device's wait (a sleep without the GIL) is the
    # forward's wall time, not its CPU time.
    for row in (packed, padded):
        steps = row["big"]["server"]["step_ms_per_batch"]
        assert set(steps) == {"build", "wait_launch", "collate", "forward", "sync", "scatter", "metrics", "pool"}
        wall, cpu = steps["forward"]
        assert wall > cpu >= 0, steps
    assert padded["big"]["server"]["padding"] < 1.0
    for row in (packed, padded):  # 3-document requests alone and beside a 600-document one
        beside = row["beside"]
        assert beside["big_docs"] == 600 and beside["alone"]["requests"] == 100 and beside["beside"]["requests"] >= 1
        assert beside["p99_ratio"] == beside["beside"]["p99_s"] / beside["alone"]["p99_s"]
    assert "| packed:400000 | gateway | 1 |" in proc.stdout and "p99 beside / alone" in proc.stdout
    assert "A batch's steps on its inference thread" in proc.stdout and "| padded:400000 c16 |" in proc.stdout


def test_gil_budget_bench_samples_who_holds_the_gil(tmp_path: Path) -> None:
    """bench.gil_budget: py-spy samples the GIL's holder in a real gateway before the simulated device, and
    each workload's GIL time comes out a pair and a request, split by the thread's job. The simulated
    launches hold the GIL on the inference threads, the Python part of tokenizing on the lanes' threads, and
    every request's HTTP and app work on the event loop."""
    out = tmp_path / "gb.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gil_budget", "--requests", "48", "--big-repeats", "2", "--json", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["c16"]["requests"] == 48 and res["big"]["pairs"] == 2 * 1000
    for workload in ("c16", "big"):
        w = res[workload]
        assert w["gil_s"] > 0 and 0 < w["gil_share"] < 1.2, w
        assert w["gil_us_per_pair"] == w["gil_s"] / w["pairs"] * 1e6
        assert abs(sum(w["us_per_pair"].values()) - w["gil_us_per_pair"]) < 1e-6 * w["gil_us_per_pair"]
    assert res["big"]["us_per_pair"]["inference: forward"] > 0 and res["big"]["us_per_pair"]["tokenizing (Python)"] > 0
    assert sum(v for k, v in res["c16"]["us_per_pair"].items() if k.startswith("event loop: ")) > 0
    assert "| c16 |" in proc.stdout and "GIL us a pair, by what held it" in proc.stdout


def test_gil_budget_names_a_sample_by_its_thread_and_step() -> None:
    """py-spy's raw lines (--threads): an inference thread's sample goes to its batch's step, a tokenizer lane's
    to tokenizing, the main thread's by its innermost frame's file: a coroutine's stack there does not reach
    the loop's own frames."""
    from bench.gil_budget import category

    infer = "thread (101): infer-sim-0;Thread._bootstrap (threading.py:1002);InferenceStreams._loop (engine/streams.py:85)"
    assert category(infer + ";Scheduler._next_job (engine/scheduler.py:521);Scheduler._build_batch (engine/scheduler.py:543)") == "inference: build"
    rows = ";BatchRunner.forward (engine/inference.py:151);BatchRunner.forward_rows (engine/inference.py:159)"
    assert category(infer + rows + ";FlagBackend.collate (backends/flag.py:77)") == "inference: collate"
    assert category(infer + rows + ";SimulatedDevice.run (bench/simulated_device.py:44)") == "inference: forward"
    assert category(infer + ";BatchRunner._answer (engine/inference.py:240);top_k (engine/pooling.py:20)") == "inference: pool"
    assert category(infer + rows + ";BatchRunner._step (engine/inference.py:87);StepClock.mark (engine/step_time.py:42)") == "inference: step clocks"
    assert category("thread (102): tok-small-sim_0;_worker (concurrent/futures/thread.py:83);Scheduler._tokenize_slice (engine/scheduler.py:370)") == "tokenizing (Python)"
    loop = "thread (100): MainThread;RequestResponseCycle.run_asgi (uvicorn/protocols/http/h11_impl.py:403)"
    assert category(loop + ";Litestar.__call__ (litestar/app.py:599)") == "event loop: framework (Litestar)"
    assert category(loop + ";RerankPipeline.rerank (serving/pipeline.py:97)") == "event loop: app"
    assert category("thread (100): MainThread;BaseEventLoop.run_forever (asyncio/base_events.py:607)") == "event loop: asyncio"
    assert category("thread (103): usage-ledger;UsageStore._serve (tenancy/usage.py:180)") == "other: usage-ledger"


def test_gil_budget_gives_up_on_a_sampler_that_never_attaches(tmp_path: Path, monkeypatch) -> None:
    """A py-spy that hangs before its first line (a ptrace that never returns) costs the run its GIL sample,
    not the run: sampled() says why within its attach limit, runs no workload unsampled, and leaves no
    sampler behind. (A real process stands in for the hung py-spy: one that sleeps and prints nothing.)"""
    import time

    import pytest

    from bench.gil_budget import SamplerUnavailable, sampled

    stuck = tmp_path / "bin" / "py-spy"
    stuck.parent.mkdir()
    stuck.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'pid'}\nexec sleep 120\n")
    stuck.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stuck.parent}{os.pathsep}{os.environ['PATH']}")
    ran = []
    start = time.monotonic()
    with pytest.raises(SamplerUnavailable, match="printed nothing in 1 s"):
        sampled(os.getpid(), tmp_path, "c16", lambda: ran.append(1) or {}, attach_timeout_s=1.0)
    assert time.monotonic() - start < 10 and not ran
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_engine_host_bench_runs_closed_loop_clients(tmp_path: Path) -> None:
    """bench.engine_host with --clients: closed-loop clients of small requests through a real Scheduler whose
    forward is taken out, every request answered; the engine's host work a pair is printed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", ENGINE_HOST_WORK=str(tmp_path), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.engine_host", "--budgets", "16384", "--clients", "4", "--requests", "3", "--docs", "20", "--rounds", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 closed-loop clients x 3 requests of 20 documents" in proc.stdout
    assert "budget  16384:" in proc.stdout and "CPU-us per pair" in proc.stdout


def test_a_gateway_whose_model_fails_to_load_ends_the_wait_at_once(tmp_path: Path) -> None:
    """bench.http_load.GatewayProcess.wait_ready: a model that cannot load leaves the gateway up and unready
    for good; the wait ends as soon as /ready says so, with the log's reason, not at its timeout (on a GPU a
    check's section would otherwise spend its whole time limit there)."""
    import time

    import pytest

    from bench.http_load import GatewayProcess

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    registry = {"default_model": "m", "models": {"m": {"backend": "flag", "source": str(broken), "runtime": "torch", "dtype": "float32"}}}
    with GatewayProcess(registry, tmp_path / "work") as gw:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"model\(s\) m failed to load") as failed:
            gw.wait_ready(timeout_s=120)
        assert time.monotonic() - start < 60 and gw.proc.poll() is None  # up, unready, and not waited out
        assert "unavailable" in str(failed.value)


def test_thread_cpu_ticks_reads_a_process_whose_threads_come_and_go() -> None:
    """bench.http_load.thread_cpu_ticks (tests/test_runtimes.py reads the engine's threads with it) leaves out
    a thread that ends while its /proc stat is read: opened before the thread ended, the read fails with
    ESRCH, not a missing file (a slow-kind run of the suite failed so). Two threads start and end threads
    without pause while it reads this process."""
    import threading
    import time

    from bench.http_load import thread_cpu_ticks

    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()

    churners = [threading.Thread(target=churn) for _ in range(2)]
    for t in churners:
        t.start()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert threading.get_native_id() in thread_cpu_ticks()
    finally:
        stop.set()
        for t in churners:
            t.join()
