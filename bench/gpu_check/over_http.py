"""Sections that talk to a `rerank-gateway serve` process over HTTP (bench.http_load), each with a registry
of plain entries written here (no profiles: what the gateway chooses by itself is what is measured).

c. http_bge: the bge shape; 1,000 / 10,000 documents, 16 and 64 closed-loop clients, small requests beside a
   10,000-document one vs alone, /v1/models' budget, process GPU memory after load and after the workloads,
   and the GIL a request holds under 16 clients (bench.gil_budget).
e. t4_gte: GTE under a T4-like cap (torch's per-process memory fraction, bench.gpu_check.serve).
f. qwen3_gateway: Qwen3-4B nf4, two requests of 320 documents cut to 512 tokens; memory and pairs/s.
g. parity: the bge shape padded (padding_free off) and packed (on): scores and speed.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bench import gil_budget, http_load
from bench.gpu_check import gpu_memory, workloads
from bench.gpu_check.checkpoints import ensure
from bench.gpu_check.flops import flop_model, of_peak, tflops
from bench.gpu_check.plan import T4_MEMORY_GB, T4_SHARE_GB, Plan
from bench.gpu_check.record import Recorder

SERVE_MODULE = "bench.gpu_check.serve"


def _registry(plan: Plan, name: str, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "default_model": next(iter(models)),
        # Big requests and long runs; the usage ledger (on by default) goes to the work folder.
        "server": {"max_documents": 10000, "request_timeout_s": 600},
        "usage": {"path": str(Path(plan.work) / f"usage-{name}.sqlite3")},
        "models": {k: dict(v, **plan.entry_extra) for k, v in models.items()},
    }


@contextmanager
def serving(rec: Recorder, plan: Plan, name: str, models: dict[str, dict[str, Any]], env: dict[str, str] | None = None) -> Iterator[http_load.GatewayProcess]:
    """A gateway on these models: ready time, /v1/models and process memory after load recorded."""
    work = Path(plan.work)
    env = dict(env or {}, GPU_CHECK_RECORD_MODULES=str(work / "modules" / f"gateway-{name}.txt"))
    gw = http_load.GatewayProcess(_registry(plan, name, models), work / "logs", name=f"gateway-{name}", env=env, module=SERVE_MODULE)
    try:
        start = time.perf_counter()
        gw.wait_ready(plan.ready_timeout_s)
        rec.put("ready_s", time.perf_counter() - start)
        rec.put("models", {m["id"]: m for m in gw.models()})
        rec.put("memory_after_load", gpu_memory.snapshot(gw.proc.pid))
        yield gw
    finally:
        gw.close()


def _rate(run: dict[str, Any], tokens: int, flops: float, ceiling: float | None) -> dict[str, Any]:
    run = dict(run)
    run.pop("scores", None)
    seconds = run["seconds"]
    run["real_tokens"] = tokens
    run["real_tokens_per_s"] = tokens / seconds
    run["tflops"] = tflops(flops, seconds)
    run["of_peak"] = of_peak(run["tflops"], ceiling)
    return run


def _ceiling(ctx: dict, dtype: str = "fp16") -> float | None:
    m = (ctx.get("ceilings") or {}).get(f"matmul_{dtype}") or {}
    return m.get("tflops")


def _metrics_excerpt(gw: http_load.GatewayProcess, prefixes: tuple[str, ...] = ("rerank_oom", "rerank_padding", "rerank_batch")) -> list[str]:
    return [line for line in gw.metrics_text().splitlines() if line.startswith(prefixes)][:40]


# -- c. the bge shape over HTTP ------------------------------------------------------------------------------


def http_bge(rec: Recorder, plan: Plan, ctx: dict) -> None:
    path, built = ensure("bge_shape", plan.work, plan.smoke, isolated=True)
    rec.put("build_s", built)
    words = workloads.bge_words(path)
    bigs = {n: workloads.bge_big(words, n) for n in sorted({*plan.big_docs, plan.beside_docs})}
    # Each closed loop (and the warm-up) gets requests of its own: nothing is scored twice.
    smalls = workloads.bge_small(words, 32 + sum(r for _, r in plan.closed_loops) + plan.gil_requests, plan.small_docs)
    threes = workloads.bge_small(words, max(400, plan.alone_requests), 3)
    fm = flop_model(path)
    ceiling = _ceiling(ctx)
    # Real tokens of each workload (the pairs as the model sees them, cut at 512): the honest rate.
    count = workloads.PairTokens(path, 512)
    tokens: dict[str, list[int]] = {f"big_{n}": count(req.query, req.documents) for n, req in bigs.items()}
    tokens["small"] = [sum(count(r.query, r.documents)) for r in smalls]
    loops, start = [], 32
    for clients, requests in plan.closed_loops:
        loops.append((clients, slice(start, start + requests)))
        start += requests
    rec.put("tokens", {k: {"pairs": len(v), "real_tokens": sum(v), "per_pair": sum(v) / max(1, len(v))} for k, v in tokens.items() if k != "small"})
    flops = {k: fm.total(v) for k, v in tokens.items() if k != "small"}

    model = {"backend": "flag", "source": str(path), "max_length": 512, "load": "eager"}
    with serving(rec, plan, "bge", {"bge": model}) as gw:
        with rec.step("warm"):
            http_load.closed_loop(gw.base, "bge", smalls[:32], 16)
            http_load.big(gw.base, "bge", bigs[plan.big_docs[0]])
        for n in plan.big_docs:
            with rec.step(f"big_{n}"):
                runs = []
                for _ in range(2 if n == plan.big_docs[0] else 1):
                    run = http_load.costed(gw, "bge", lambda: http_load.big(gw.base, "bge", bigs[n]))
                    runs.append(_rate(run, sum(tokens[f"big_{n}"]), flops[f"big_{n}"], ceiling))
                    rec.put(f"big_{n}", runs)
        for clients, part in loops[:1]:
            _closed(rec, gw, clients, smalls[part], tokens["small"][part])
        _gil(rec, plan, gw, smalls[start : start + plan.gil_requests])
        with rec.step("beside"):
            beside = http_load.costed(gw, "bge", lambda: http_load.beside_big(gw.base, "bge", bigs[plan.beside_docs], threes))
            rec.put("beside", {"beside": beside})
            alone = http_load.sequential(gw.base, "bge", threes[: plan.alone_requests])
            rec.put("beside", {"beside": beside, "alone": alone, "p99_ratio": beside["p99_s"] / alone["p99_s"], "big_docs": plan.beside_docs})
        for clients, part in loops[1:]:
            _closed(rec, gw, clients, smalls[part], tokens["small"][part])
        rec.put("memory_after_workloads", gpu_memory.snapshot(gw.proc.pid))
        # What a batch cost the device over these workloads, as the engine learnt it (floor + tokens / rate):
        # the floor decides how far the time bound can cut bulk batches beside searches.
        rec.put("batch_time", {m["id"]: m.get("batch_time") for m in gw.models()})
        with rec.step("metrics"):
            rec.put("metrics", _metrics_excerpt(gw))


def _closed(rec: Recorder, gw: http_load.GatewayProcess, clients: int, requests: list, tokens: list[int]) -> None:
    with rec.step(f"clients_{clients}"):
        out = http_load.costed(gw, "bge", lambda: http_load.closed_loop(gw.base, "bge", requests, clients))
        out["clients"] = clients
        out["docs_per_request"] = len(requests[0].documents)
        out["real_tokens_per_s"] = sum(tokens) / out["seconds"]
        out["p99_over_p50"] = out["p99_s"] / out["p50_s"]
        rec.put(f"clients_{clients}", out)


def _gil(rec: Recorder, plan: Plan, gw: http_load.GatewayProcess, requests: list) -> None:
    """16 more clients, with requests of their own, while py-spy samples the GIL's holder (bench.gil_budget):
    what a 20-document request holds the GIL for on this host, by thread and batch step. One process serves
    at most 1 / (GIL seconds a pair) pairs a second, however many cores the host has. Sampled apart from the
    measured loops, so the sampler does not touch their figures."""
    with rec.step("gil_16"):
        try:
            result, samples = gil_budget.sampled(
                gw.proc.pid, Path(plan.work), "gil_16", lambda: http_load.closed_loop(gw.base, "bge", requests, 16)
            )
        except gil_budget.SamplerUnavailable as exc:
            rec.put("gil_16", {"error": str(exc)})
            return
        rec.put("gil_16", gil_budget.summary(samples, gil_budget.RATE, result["pairs"], result["requests"], result["seconds"]))


# -- e. GTE under a T4-like memory cap -----------------------------------------------------------------------


def t4_gte(rec: Recorder, plan: Plan, ctx: dict) -> None:
    path, built = ensure("gte_base", plan.work, plan.smoke, isolated=True)
    rec.put("build_s", built)
    big, smalls = workloads.gte_t4(plan.t4_docs, plan.t4_long_docs, plan.t4_long_words, plan.t4_loop_requests, plan.small_docs)
    with rec.step("tokens"):
        long_docs = [d for d in big.documents if len(d.split()) >= plan.t4_long_words]
        cut = workloads.PairTokens(path, 8192)(big.query, long_docs)
        rec.put("long_docs", {"count": len(long_docs), "tokens_after_cut": [min(cut), max(cut)] if cut else None})
    model = {
        "backend": "gte", "source": str(path), "max_length": 8192, "load": "eager",
        # The capped process still reads the H200's 141 GB as its card's size; a T4's even share is given
        # as the model's memory budget so the automatic budget is sized as on a real T4.
        "memory_budget_gb": T4_SHARE_GB,
        # A T4 (compute capability 7.5) has no flash-attention varlen kernel, so `auto` pads there
        # (backends.varlen.kernel_runs): padded here too, whatever card runs the check.
        "padding_free": "off",
    }
    env = {"GPU_CHECK_MEMORY_GB": str(T4_MEMORY_GB)}
    with serving(rec, plan, "t4", {"gte": model}, env=env) as gw:
        with rec.step("big"):
            out = http_load.big(gw.base, "gte", big)
            out.pop("scores")
            out["status"] = 200
            rec.put("big", out)
        with rec.step("clients_16"):
            out = http_load.closed_loop(gw.base, "gte", smalls, 16)
            out["p99_over_p50"] = out["p99_s"] / out["p50_s"]
            rec.put("clients_16", out)
        rec.put("memory_after_workloads", gpu_memory.snapshot(gw.proc.pid))
        with rec.step("oom"):
            log = gw.log_path.read_text(errors="replace")
            rec.put("oom", {
                "log_lines": len(re.findall(r"out of memory|OutOfMemory", log, flags=re.IGNORECASE)),
                "metrics": [line for line in _metrics_excerpt(gw, ("rerank_oom",)) if not line.startswith("#")],
            })
        with rec.step("cap"):
            rec.put("cap", [line for line in gw.log_path.read_text(errors="replace").splitlines() if "memory cap" in line][:3])


# -- f. Qwen3-4B nf4 through the gateway ----------------------------------------------------------------------


def qwen3_gateway(rec: Recorder, plan: Plan, ctx: dict) -> None:
    path, built = ensure("qwen3_4b", plan.work, plan.smoke, isolated=True)
    rec.put("build_s", built)
    requests = workloads.qwen_pairs(plan.qwen_pairs, plan.qwen_doc_words)
    model = {"backend": "qwen3", "source": str(path), "quantization": "nf4", "max_length": plan.qwen_max_length, "load": "eager"}
    with serving(rec, plan, "qwen3", {"qwen3": model}) as gw:
        runs = []
        for k, req in enumerate(requests, 1):
            with rec.step(f"request_{k}"):
                out = http_load.big(gw.base, "qwen3", req)
                scores = out.pop("scores")
                out["finite_scores"] = sum(1 for s in scores if s == s)
                out["memory_after"] = gpu_memory.snapshot(gw.proc.pid)
                runs.append(out)
                rec.put("requests", runs)


# -- g. padded vs packed ---------------------------------------------------------------------------------------


def parity(rec: Recorder, plan: Plan, ctx: dict) -> None:
    path, built = ensure("bge_shape", plan.work, plan.smoke, isolated=True)
    rec.put("build_s", built)
    words = workloads.bge_words(path)
    req = workloads.bge_big(words, plan.parity_docs)
    warm = workloads.bge_small(words, 4, 20)
    base = {"backend": "flag", "source": str(path), "max_length": 512, "load": "eager"}
    models = {"padded": dict(base, padding_free="off"), "packed": dict(base, padding_free="on")}
    with serving(rec, plan, "parity", models) as gw:
        for name in models:
            http_load.closed_loop(gw.base, name, warm, 2)
        scores: dict[str, list[float]] = {}
        speed: dict[str, list[float]] = {name: [] for name in models}
        for order in (("padded", "packed"), ("packed", "padded")):
            for name in order:
                with rec.step(f"{name}_{len(speed[name]) + 1}"):
                    out = http_load.big(gw.base, name, req)
                    scores.setdefault(name, out["scores"])
                    speed[name].append(out["pairs_per_s"])
                    rec.put("pairs_per_s", speed)
        with rec.step("compare"):
            import numpy as np

            a, b = np.asarray(scores["padded"]), np.asarray(scores["packed"])
            top = 10
            rec.put("scores", {
                "pairs": len(a), "max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff": float(np.abs(a - b).mean()),
                "score_std": float(a.std()), "spearman": workloads.spearman(list(a), list(b)),
                "top10_overlap": len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top])) / top,
            })
