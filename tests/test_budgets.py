"""Automatic token budgets, `rerank-gateway tune`, `plan` on measured figures, the memory measurement."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import yaml

from conftest import MINILM, app_client, minilm_registry
from core import budgets, host
from core.config import effective, load_registry, parse_registry
from ops.cli import main
from ops.tune import pair_lengths, peak_live_bytes

SHIPPED = Path(__file__).resolve().parent.parent / "registry.yaml"


def test_a_profile_less_model_gets_the_measured_cpu_budget_and_says_why():
    registry = minilm_registry()  # no profiles, no max_batch_tokens
    want, _ = budgets.cpu_budget("embedding", 2)
    with app_client(registry) as client:
        model = client.get("/v1/models").json()["data"][0]
        assert model["state"] == "ready"
        assert model["max_batch_tokens"] == want < 16384
        assert model["budget_reason"].startswith("auto (no cpu profile)")
        # The scheduler really runs with it.
        scheduler = client.app.state.pipeline.pool.entries["minilm"].scheduler
        assert scheduler.max_batch_tokens == want


def test_models_shows_what_a_batch_costs_once_batches_have_run():
    """/v1/models reports a batch's time as the engine learns it from the batches run (floor + tokens / rate,
    engine.batch_time): absent before the first batch, then from every batch (here, on the CPU, timed by the
    host's clock around the forward)."""
    with app_client(minilm_registry()) as client:
        assert "batch_time" not in client.get("/v1/models").json()["data"][0]
        short = client.post("/v1/rerank", json={"model": "minilm", "query": "q", "documents": ["a b", "c d", "e f"]})
        long = client.post("/v1/rerank", json={"model": "minilm", "query": "q", "documents": [" ".join(["word"] * 40)] * 120})
        assert short.status_code == long.status_code == 200
        batch = client.get("/v1/models").json()["data"][0]["batch_time"]
        assert batch["batches"] >= 2 and batch["tokens_per_s"] > 0 and batch["floor_ms"] >= 0
        scheduler = client.app.state.pipeline.pool.entries["minilm"].scheduler
        assert batch == scheduler.batch_time()


def test_models_shows_the_ladder_a_budget_was_chosen_from():
    """On a GPU a profile-less model's runner keeps the ladder its budget was chosen from (pool.local_loading)
    and /v1/models shows it. Here the ladder is measured on the loaded model's own scheduler, as the load does."""
    with app_client(minilm_registry()) as client:
        runner = client.app.state.pipeline.pool.entries["minilm"].runner
        assert "budget_ladder" not in client.get("/v1/models").json()["data"][0]  # a CPU budget has no ladder
        runner.budget_ladder = runner.scheduler.measure_ladder([128, 256], 64)
        model = client.get("/v1/models").json()["data"][0]
        # Two rungs, or one where a loaded machine kept the second's batch past LADDER_MAX_BATCH_S.
        assert model["budget_ladder"] == runner.budget_ladder and 1 <= len(model["budget_ladder"]) <= 2


def test_an_explicit_budget_wins_and_is_named():
    profiled = minilm_registry(profiles={"cpu": {"max_batch_tokens": 512}})
    eff = effective(profiled.models["minilm"], "cpu")
    assert (eff.max_batch_tokens, eff.budget_reason, eff.auto_budget) == (512, "profile cpu", False)
    plain = minilm_registry(max_batch_tokens=3000)
    eff = effective(plain.models["minilm"], "cpu")
    assert (eff.max_batch_tokens, eff.budget_reason) == (3000, "the model's max_batch_tokens in the registry")


def test_cpu_budget_by_cpu_kind_and_threads_per_stream():
    assert budgets.cpu_budget("flag", 2, cores=2, kind="other")[0] == 1024
    assert budgets.cpu_budget("flag", 2, cores=2, kind="amx")[0] == 2048
    tokens, why = budgets.cpu_budget("flag", 2, cores=16, kind="other")  # 2 streams x 8 threads
    assert tokens == 8 * 1024 and "scaled" in why and "16 cores / 2 streams" in why
    assert "no CPU measurement" in budgets.cpu_budget("qwen3", 2, cores=2)[1]
    assert host.cpu_kind() in budgets.CPU_BEST_TOKENS_PER_THREAD


def test_a_gpu_without_a_profile_is_sized_from_the_warm_up():
    reg = parse_registry({"default_model": "m", "models": {"m": {"backend": "flag", "source": "x", "max_length": 512}},
                          "gpu_types": {"L4": {"match": "L4", "memory_gb": 24}}})
    eff = effective(reg.models["m"], "L4")
    assert eff.auto_budget and eff.device == "cuda" and eff.max_batch_tokens == budgets.GPU_PROBE_TOKENS
    gib = 1024**3
    # 1 GiB of weights, 40 KiB/token measured at the probe, a 4 GiB budget: (4 x 0.9 - 1) GiB / 40 KiB.
    tokens, why = budgets.gpu_budget(weights_bytes=gib, activation_bytes=8192 * 40 * 1024, probe_tokens=8192,
                                     budget_bytes=4 * gib, max_length=512)
    assert tokens == int(2.6 * gib / (40 * 1024)) // 256 * 256 == 68096
    assert "40.0 KiB/token" in why and "4.00 GiB budget" in why
    with pytest.raises(ValueError, match="less than one pair"):
        budgets.gpu_budget(weights_bytes=gib, activation_bytes=8192 * 40 * 1024, probe_tokens=8192,
                           budget_bytes=1.1 * gib, max_length=512)


def test_a_gpu_budget_is_the_knee_of_the_measured_ladder_not_the_memory_cap():
    """The memory cap only bounds the ladder; the budget is the smallest rung within 5% of the fastest."""
    assert budgets.ladder_rungs(512, 1 << 20) == [4096, 8192, 16384, 32768, 65536, 131072, 262144]
    assert budgets.ladder_rungs(8192, 40000) == [8192, 16384, 32768]  # a rung holds one full-length pair
    assert budgets.ladder_rungs(512, 3000) == [2816]  # no power of two fits: the cap itself, rounded
    # A curve like the first GPU run's (16,384 -> 65,536 tokens: +14%): the knee is 32,768, within 5%.
    curve = [(4096, 400e3), (8192, 700e3), (16384, 1000e3), (32768, 1100e3), (65536, 1140e3), (131072, 1150e3)]
    assert budgets.knee(curve) == 32768
    assert budgets.knee(curve, tolerance=0.0) == 131072
    # The climb stops once two rungs in a row gain under 2%, and not before.
    rates = [r for _, r in curve]
    assert budgets.climbing(rates[:4]) and budgets.climbing(rates[:5])
    assert not budgets.climbing(rates[:4] + [1110e3, 1115e3])


def _ladder_scheduler():
    """A Scheduler on the tests' MiniLM (torch, one stream) to measure ladders with."""
    from backends.embedding import EmbeddingBackend
    from core.config import model_spec
    from engine import Scheduler

    spec = model_spec(backend="embedding", source=MINILM, max_length=64, dtype="float32", runtime="torch")
    backend = EmbeddingBackend("minilm", spec, effective(spec, "cpu"))
    backend.load()
    return Scheduler(backend, max_batch_tokens=512, max_batch_size=64, max_queue_pairs=10, max_queue_tokens=10**6, streams=1)


def test_the_ladder_measures_real_batches_and_stops_where_it_flattens(monkeypatch):
    """Scheduler.measure_ladder runs one full batch of typical pairs per rung in the inference thread, and
    stops climbing once the rate flattens (on a CPU, timed by the wall clock; peaks are not measured). The
    limit on a batch's time is out of the way: a loaded CI machine can starve the inference thread (nice 10)
    past it, and the next test is about it."""
    import engine.scheduler

    monkeypatch.setattr(engine.scheduler, "LADDER_MAX_BATCH_S", 60.0)

    s = _ladder_scheduler()
    seen: list[int] = []
    s.step_hook = lambda step, info: seen.append(int(info.lengths.sum())) if step == "collate" else None
    rungs = [128, 256, 512, 1024]
    try:
        ladder = s.measure_ladder(rungs, 64)
    finally:
        s.close()
    assert [r["max_batch_tokens"] for r in ladder] == rungs[: len(ladder)] and len(ladder) >= 3
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] == 0 for r in ladder)
    # Each rung ran full batches of its size: typical 64- and 63-token pairs filling it (one untimed run, then timed ones).
    assert seen[:4] == [127] * 4 and seen[4:8] == [254] * 4
    rates = [r["tokens_per_s"] for r in ladder]
    assert len(ladder) == len(rungs) or not budgets.climbing(rates), "the climb stopped only where the rate flattened"


def test_peak_live_bytes_sees_allocations_and_frees():
    def work():
        a = torch.empty(40 << 20, dtype=torch.uint8)
        b = torch.empty(10 << 20, dtype=torch.uint8)
        del a
        c = torch.ones(20 << 20, dtype=torch.uint8)  # reuses nothing: a's 40 MiB are already free
        return b, c

    peak, _ = peak_live_bytes(work)
    assert peak == 50 << 20


def test_tune_prints_a_profile_that_plan_rps_sizes_pools_from(tmp_path, capsys):
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"default_model": "mini", "models": {
        "mini": {"backend": "embedding", "source": MINILM, "max_length": 64, "cpu_streams": 1, "runtime": "torch"}}}))
    # Before tuning there is nothing to size from.
    assert main(["plan", "--registry", str(path), "--rps", "10", "--docs", "100", "--doc-tokens", "200"]) == 1
    assert "no measured profile" in capsys.readouterr().out
    assert main(["tune", "mini", "--registry", str(path), "--budgets", "128,512", "--pairs", "40", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "pairs/s" in out and "<- chosen" in out
    # The comment names the machine and the date the figures came from.
    assert host.cpu_model_name() in out and datetime.now(timezone.utc).strftime("%Y-%m-%d") in out
    fragment = yaml.safe_load(out)
    profile = fragment["models"]["mini"]["profiles"]["cpu"]
    assert profile["max_batch_tokens"] in (128, 512)
    # The chosen budget's real throughput: tokens/s over pairs/s is the workload's mean pair length.
    lengths = pair_lengths(40, 64)
    mean = sum(lengths) / len(lengths)
    # (within the rounding: tokens/s to 1, pairs/s to 0.1)
    assert abs(profile["measured_tokens_per_s"] - profile["measured_pairs_per_s"] * mean) <= 0.05 * mean + 0.5
    assert profile["measured_cpu_cores"] == host.cpu_cores()
    merged = yaml.safe_load(path.read_text())
    merged["models"]["mini"]["profiles"] = fragment["models"]["mini"]["profiles"]
    reg = parse_registry(merged)
    assert effective(reg.models["mini"], "cpu").budget_reason == "profile cpu"
    # Pasted into the registry, `plan --rps` answers for the model from those figures.
    path.write_text(yaml.safe_dump(merged))
    assert main(["plan", "--registry", str(path), "--rps", "10", "--docs", "100", "--doc-tokens", "200"]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("mini "))
    pair = 64  # 32 + 200 + special tokens, truncated at max_length
    workers = math.ceil(1000 / (profile["measured_tokens_per_s"] / pair * 0.7))
    assert row[1] == "cpu" and row[2] == str(pair) and row[4] == str(workers)
    assert row[6] == str(workers * profile["measured_cpu_cores"])


def test_plan_reads_the_measured_figures(capsys):
    reg = load_registry(SHIPPED)
    qwen = reg.models["qwen3-reranker-4b"]
    assert main(["plan", "--gpu", "T4", "--registry", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("qwen3-reranker-4b"))
    assert f"{qwen.weights_gb:.2f}" in line and f"{qwen.activation_kb_per_token:.0f}" in line
    # The figures are the measured ones, and the file says where each came from.
    text = SHIPPED.read_text()
    assert "bench/memory.py" in text and "PAPER ESTIMATE" not in text


def test_memory_measurement_smoke_on_tiny_models():
    from bench import memory

    rows = memory.measure_arch("bge-reranker-large", [64, 256], Path(__import__("tempfile").mkdtemp()), tiny=True)
    assert [r.budget for r in rows] == [64, 256]
    for r in rows:
        assert r.weights_gb > 0 and r.peak_activation_gb > 0 and r.padded_tokens == r.budget
    # More tokens in the batch, more live bytes at the peak.
    assert rows[1].peak_activation_gb > rows[0].peak_activation_gb


def test_pairs_per_batch_follow_a_gpu_budget_unless_the_registry_sets_them():
    """A packed GPU batch costs its tokens, not its rows: 256 rows would cut a 131,072-token budget of
    ~114-token pairs to 29,000 tokens. On a CPU and where the registry says, the number stands."""
    reg = parse_registry({
        "default_model": "m",
        "models": {
            "m": {"backend": "flag", "source": "x", "max_length": 512, "profiles": {"H200": {"max_batch_tokens": 131072}}},
            "set": {"backend": "flag", "source": "x", "max_length": 512, "max_batch_size": 64,
                    "profiles": {"H200": {"max_batch_tokens": 131072}}},
        },
        "gpu_types": {"H200": {"match": "H200", "memory_gb": 141}},
    })
    gpu, cpu, fixed = effective(reg.models["m"], "H200"), effective(reg.models["m"], "cpu"), effective(reg.models["set"], "H200")
    assert gpu.max_batch_size == 131072 // budgets.GPU_PAIR_TOKENS and not gpu.max_batch_size_set
    assert cpu.max_batch_size == budgets.DEFAULT_BATCH_PAIRS
    assert fixed.max_batch_size == 64 and fixed.max_batch_size_set


def test_a_rung_whose_batch_takes_too_long_is_not_on_the_ladder(monkeypatch):
    """A rung whose batch takes over LADDER_MAX_BATCH_S ends the climb and is not on the ladder, so the knee
    cannot choose it, however much faster it ran: a search would wait for such a batch in flight. The rates
    are given as a GPU would measure them (measure_rate: a batch's device time), here 0.77 s a batch at
    65,536 tokens, 14% faster than 32,768 at 0.41 s, as on the first GPU run."""
    from engine import Scheduler

    curve = {16384: (60e3, 0.27), 32768: (80e3, 0.41), 65536: (85e3, 0.77), 131072: (86e3, 1.5)}
    monkeypatch.setattr(Scheduler, "measure_rate", lambda self, budget, length, max_pairs=None: {
        "tokens_per_s": curve[budget][0], "seconds": curve[budget][1], "peak_bytes": 0, "tokens": budget})
    s = _ladder_scheduler()
    try:
        ladder = s.measure_ladder(list(curve), 512)
        assert [r["max_batch_tokens"] for r in ladder] == [16384, 32768]
        assert budgets.knee([(r["max_batch_tokens"], r["tokens_per_s"]) for r in ladder]) == 32768
        first = s.measure_ladder([65536, 131072], 512)  # the first rung stands whatever its time, and ends the climb
        assert [r["max_batch_tokens"] for r in first] == [65536]
    finally:
        s.close()



def _load_as_on_a_gpu(monkeypatch, max_length: int, memory, **eff_fields):
    """pool.local_loading.load_local on the path a profile-less GPU model takes (auto_budget, a 1 GB memory
    budget), run on the CPU with the tests' MiniLM. `memory(budget, warmup)` gives each warm-up's memory as a
    GPU's allocator counters would read it (a CPU has none), or raises as the GPU would."""
    import msgspec

    import engine.scheduler
    import pool.local_loading
    from core.config import ServerSettings, model_spec
    from observability.metrics import Metrics

    warmup = engine.scheduler.run_warmup
    monkeypatch.setattr(engine.scheduler, "run_warmup", lambda *args, **kwargs: memory(kwargs["budget"], warmup(*args, **kwargs)))
    spec = model_spec(backend="embedding", source=MINILM, max_length=max_length, dtype="float32", runtime="torch")
    eff = msgspec.structs.replace(
        effective(spec, "cpu"), auto_budget=True, max_batch_tokens=budgets.gpu_probe_tokens(max_length), memory_budget_gb=1.0, **eff_fields,
    )
    return pool.local_loading.load_local("m", spec, eff, server=ServerSettings(), metrics=Metrics(), cuda_models=1)


def test_a_gpu_budget_counts_memory_a_token_of_the_probe_batch_as_run(monkeypatch):
    """A profile-less GPU model's memory cap divides the probe warm-up's activations by the tokens that batch
    had (rows x width), not by the probe's budget: at max_length 500, 4 pairs fill 2,000 of a 2,048-token
    probe, and dividing by 2,048 would read memory a token low and allow too big a budget. The warm-up's
    memory is read as a GPU reads it: 4 KiB a padded token and a 32 MiB workspace. (The probe, and the ladder
    with its rates given, are small: the point is the cap, and the real warm-ups stay quick.)"""
    import engine.scheduler
    import pool.local_loading

    monkeypatch.setattr(budgets, "GPU_PROBE_TOKENS", 2048)
    monkeypatch.setattr(budgets, "LADDER_MIN", 1024)
    monkeypatch.setattr(engine.scheduler.Scheduler, "measure_rate", lambda self, budget, length, max_pairs=None: {
        "tokens_per_s": 1e5, "seconds": 0.01, "peak_bytes": 0, "tokens": budget})
    per_token, workspace = 4096, 32 << 20

    def as_a_gpu_reads_it(budget, out):
        return out | {"memory_measured": True, "workspace_bytes": workspace, "activation_bytes": workspace + out["padded_tokens"] * per_token}

    runner = _load_as_on_a_gpu(monkeypatch, 500, as_a_gpu_reads_it, max_batch_size=64)
    try:
        cap, _ = budgets.gpu_budget(
            weights_bytes=runner.weights_bytes + workspace, activation_bytes=per_token, probe_tokens=1, budget_bytes=1.0 * pool.local_loading.GB,
            max_length=500,
        )
        assert f"memory allows up to {cap} " in runner.budget_reason, runner.budget_reason
    finally:
        runner.scheduler.close()


def test_a_knee_that_runs_out_of_memory_at_full_width_falls_to_the_rung_below(monkeypatch):
    """The knee is proven by a warm-up at full width. Should that run out of memory (the memory model was
    optimistic), the model loads at the ladder's next rung down that holds, and says so, rather than being
    unavailable. The ladder's rates and the knee's out-of-memory are given as a GPU would report them."""
    import engine.scheduler
    import pool.local_loading
    from engine.warmup import BudgetDoesNotHold

    monkeypatch.setattr(budgets, "GPU_PROBE_TOKENS", 1024)  # a quick real probe warm-up
    curve = {1024: 100e3, 2048: 180e3, 4096: 200e3, 8192: 202e3, 16384: 203e3}  # the knee: 4,096
    monkeypatch.setattr(pool.local_loading, "ladder_rungs", lambda length, cap: list(curve))
    monkeypatch.setattr(engine.scheduler.Scheduler, "measure_rate", lambda self, budget, length, max_pairs=None: {
        "tokens_per_s": curve[budget], "seconds": 0.01, "peak_bytes": 0, "tokens": budget})
    tried = []

    def as_a_gpu_reads_it(budget, out):
        tried.append(budget)
        if budget == 4096:
            raise BudgetDoesNotHold("the warm-up batch ran out of memory")
        return out | {"memory_measured": True, "workspace_bytes": 0, "activation_bytes": 1 << 20}

    runner = _load_as_on_a_gpu(monkeypatch, 64, as_a_gpu_reads_it)
    try:
        assert tried == [budgets.gpu_probe_tokens(64), 4096, 2048]  # the probe, the knee, the rung below
        assert runner.scheduler.max_batch_tokens == 2048
        assert "2048 tokens, a rung below 4096" in runner.budget_reason and "ran out of memory" in runner.budget_reason
    finally:
        runner.scheduler.close()


def test_tune_prints_the_ladder_and_cap_the_load_chooses_from(monkeypatch):
    """`tune` on a GPU prints the load-time ladder a plain entry would measure: the same probe warm-up, memory
    cap and rungs as the load (pool.local_loading.measure_budget_ladder), so its knee is the one the model
    would run. Before, tune climbed to LADDER_MAX with no memory cap, and on a small card its knee could be
    one the load never allows. The warm-up's memory is given as a GPU reads it: 1 MiB a padded token in a
    1 GB budget caps the ladder under 1,024 tokens; the rates as a GPU measures them, still climbing at
    LADDER_MAX. (The probe and the ladder's first rung are made small, so the real warm-ups are quick.)"""
    import math

    import msgspec

    import engine.scheduler
    import ops.tune
    from backends.embedding import EmbeddingBackend
    from core.config import model_spec

    monkeypatch.setattr(budgets, "GPU_PROBE_TOKENS", 1024)
    monkeypatch.setattr(budgets, "LADDER_MIN", 256)
    measured: list[int] = []

    def rate(self, budget, length, max_pairs=None):
        measured.append(budget)
        return {"tokens_per_s": 1e4 * math.log2(budget), "seconds": 0.01, "peak_bytes": budget * 1000, "tokens": budget}

    monkeypatch.setattr(engine.scheduler.Scheduler, "measure_rate", rate)

    def as_a_gpu_reads_it(budget, out):
        return out | {"memory_measured": True, "workspace_bytes": 0, "activation_bytes": out["padded_tokens"] << 20}

    runner = _load_as_on_a_gpu(monkeypatch, 64, as_a_gpu_reads_it)
    runner.scheduler.close()
    loaded, measured[:] = list(measured), []
    assert loaded == [256, 512] and [r["max_batch_tokens"] for r in runner.budget_ladder] == loaded

    spec = model_spec(backend="embedding", source=MINILM, max_length=64, dtype="float32", runtime="torch", memory_budget_gb=1.0)
    eff = msgspec.structs.replace(effective(spec, "cpu"), auto_budget=True, max_batch_tokens=budgets.gpu_probe_tokens(64))
    backend = EmbeddingBackend("m", spec, eff)
    backend.load()
    registry = parse_registry({"default_model": "m", "models": {"m": {"backend": "embedding", "source": MINILM}}})
    cap, ladder = ops.tune._load_time_ladder(registry, "cpu", spec, eff, backend)
    assert measured == loaded and ladder == runner.budget_ladder
    assert f"memory allows up to {cap} " in runner.budget_reason
    lines = ops.tune._ladder_lines(ladder, cap)
    assert f"memory allows up to {cap} tokens" in lines[0] and "<- knee" in lines[-1] and len(lines) == 3


def test_the_ladder_runs_no_batch_bigger_than_the_registry_allows(monkeypatch):
    """A registry's max_batch_size bounds every batch the model runs, so the ladder measures batches of at most
    that many pairs (real batches, seen at collation); unset, a rung's pairs follow its budget. The load
    passes the registry's number, and only when the registry sets it."""
    import engine.scheduler

    monkeypatch.setattr(engine.scheduler, "LADDER_MAX_BATCH_S", 60.0)  # a loaded machine's slow batch is not the point here
    s = _ladder_scheduler()
    seen: list[int] = []
    s.step_hook = lambda step, info: seen.append(len(info.lengths)) if step == "collate" else None
    try:
        s.measure_ladder([256, 512], 64, max_pairs=3)
        assert seen and set(seen) == {3}, seen
        seen.clear()
        s.measure_ladder([256, 512], 64)
        assert set(seen) == {4, 8}, seen  # 64- and 63-token pairs filling each rung
    finally:
        s.close()

    asked: list[int | None] = []

    def rate(self, budget, length, max_pairs=None):
        asked.append(max_pairs)
        return {"tokens_per_s": 1e5, "seconds": 0.01, "peak_bytes": 0, "tokens": budget}

    monkeypatch.setattr(engine.scheduler.Scheduler, "measure_rate", rate)

    def as_a_gpu_reads_it(budget, out):
        return out | {"memory_measured": True, "workspace_bytes": 0, "activation_bytes": out["padded_tokens"] << 20}

    monkeypatch.setattr(budgets, "GPU_PROBE_TOKENS", 1024)
    monkeypatch.setattr(budgets, "LADDER_MIN", 256)
    _load_as_on_a_gpu(monkeypatch, 64, as_a_gpu_reads_it, max_batch_size=8, max_batch_size_set=True).scheduler.close()
    assert asked and set(asked) == {8}
    asked.clear()
    _load_as_on_a_gpu(monkeypatch, 64, as_a_gpu_reads_it).scheduler.close()
    assert asked and set(asked) == {None}
