"""The host path at GPU speed, measured on a CPU: a model whose inference costs almost nothing.

On a fast GPU the gateway's host work (HTTP, JSON, tokenizing, batch building, collation, scatter, top-k)
is what bounds throughput. A CPU with a tiny cross-encoder (2 layers, hidden 32, the MiniLM WordPiece
tokenizer: inference nearly free) is the same regime, so this benchmark stands in for the GPU here:

- `loop`: an in-process, single-threaded, length-sorted token-budget loop on the same model (tokenize all,
  sort, cut batches, forward each): what a user writes by hand, with no HTTP at all.
- `big`: the gateway over HTTP, one request of 1,000 documents (bench.workload), BIG_REPEATS in a row.
- `c16`: 16 closed-loop clients x 20-document requests, with the plain entry (budget chosen by the
  gateway) and with `max_batch_tokens: 16384`: pairs/s, p50, p99, max.
- `one_doc`: 100 one-document requests from one client: what a request costs the server whatever its size.

For each gateway workload, what the server spent on it: CPU time of the whole process per pair and per
request, split by what its threads do (event loop and small requests' tokenizing / inference streams / bulk
tokenizing, told apart by their priorities), and its batches from /metrics (pairs per batch, padding,
forward wall time per batch, and an inference thread's wall and CPU time a batch in each step).

Rounds interleave the systems, so drift in the machine's load hits them alike; read the ratios.

    python -m bench.host_path                   # ~2 min on 2 cores; markdown on stdout
    python -m bench.host_path --rounds 1 --json out.json
    python -m bench.host_path --rounds 1 --quick    # a smoke run (tests/test_bench_smoke.py)
    python -m bench.host_path --runtime auto    # the gateway's default runtime instead of the loop's eager forward
    python -m bench.host_path --baseline /tmp/old   # also a checkout of another commit, side by side
                                                    # (git worktree add /tmp/old d565279)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import http_load
from bench.http_load import costed
from bench.report import run_and_report
from bench.sorted_loop import length_runs, padded
from bench.workload import Request, big_request, small_requests, vocabulary
from core.host import cpu_model_name
from engine.scheduler import SEARCH_RECENT_S
from tests.tiny_models import build_minilm_tiny_cross_encoder

MAX_LENGTH = 512
# One 1,000-document request lasts ~0.4 s on 2 cores, a closed loop of 16 x 15 requests ~2.7 s. On a shared
# 2-core VM (AMD EPYC, 2026-12-06) the same big request took 0.63-0.82 s of server CPU from one request to the
# next, so a single one made the c16 / big ratio swing 0.63-0.94 from round to round. Each round times the big
# request (and the loop) this many times in a row and takes pairs over total seconds.
BIG_REPEATS = 3


class Loop:
    """Tokenize all pairs, sort by length, cut batches under a padded-token budget, forward each; one
    thread (the tokenizer's own parallelism off, torch on one thread)."""

    def __init__(self, model_dir: Path, budget: int) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.budget = budget

    @torch.inference_mode()
    def score(self, query: str, documents: list[str]) -> list[float]:
        enc = self.tokenizer([query] * len(documents), documents, truncation="only_second", max_length=MAX_LENGTH)
        ids, types = enc["input_ids"], enc["token_type_ids"]
        scores = torch.empty(len(ids))
        for rows in length_runs([len(x) for x in ids], self.budget):
            logits = self.model(**padded(ids, types, rows)).logits.view(-1)
            scores[torch.tensor(rows)] = logits.float()
        return torch.sigmoid(scores).tolist()


def registry(model_dir: Path, dtype: str = "float32", runtime: str = "torch") -> dict[str, Any]:
    # float32, as the loop runs: at hidden 32 bfloat16's conversions cost more than its matmuls save (6.9 vs
    # 4.7 ms a 15 x 130 batch on an AMX Xeon), and the point here is the host path, not the dtype.
    # runtime torch: the loop's own eager forward, so the comparison is of the host path alone; `auto` is the
    # gateway's default (the fastest installed CPU runtime, timed at load).
    entry = {"backend": "flag", "source": str(model_dir), "max_length": MAX_LENGTH, "load": "eager", "runtime": runtime, "dtype": dtype}
    return {
        "default_model": "plain",
        "server": {"max_documents": 10000, "request_timeout_s": 600},
        "models": {"plain": dict(entry), "b16k": dict(entry, max_batch_tokens=16384)},
    }


def _gateway(model_dir: Path, work: Path, root: Path, name: str, dtype: str, runtime: str) -> http_load.GatewayProcess:
    return http_load.GatewayProcess(registry(model_dir, dtype, runtime), work, name=name, module=http_load.serve_module(root), root=root)


def big_repeats(gw: http_load.GatewayProcess, model: str, big: Request, repeats: int = BIG_REPEATS) -> dict[str, Any]:
    """The big request `repeats` times in a row: pairs/s over their total time, the timing headers' medians."""
    runs = [http_load.big(gw.base, model, big) for _ in range(repeats)]
    seconds, pairs = sum(r["seconds"] for r in runs), sum(r["pairs"] for r in runs)
    out: dict[str, Any] = {"seconds": seconds, "pairs": pairs, "pairs_per_s": pairs / seconds, "requests": len(runs)}
    out |= {k: statistics.median(r[k] for r in runs) for k in ("tokenize_ms", "queue_ms", "inference_ms")}
    out["each_pairs_per_s"] = [r["pairs_per_s"] for r in runs]
    return out


def _measure(gw: http_load.GatewayProcess, big, small, single) -> dict[str, Any]:
    # For SEARCH_RECENT_S after a small request the engine cuts a bulk request's batches to a share of the
    # budget (so the next search waits less): the previous round's small requests must not shape this big
    # one. Without the pause, rounds after the first ran 7-9 pairs a batch instead of 16 and 0.7-0.8x.
    time.sleep(SEARCH_RECENT_S + 0.5)
    b = costed(gw, "plain", lambda: big_repeats(gw, "plain", big))
    return {
        "big": b, "c16_plain": costed(gw, "plain", lambda: http_load.closed_loop(gw.base, "plain", small, 16)),
        "c16_b16k": costed(gw, "b16k", lambda: http_load.closed_loop(gw.base, "b16k", small, 16)),
        # What one request costs the server whatever its size: one document each, one client.
        "one_doc": costed(gw, "plain", lambda: http_load.sequential(gw.base, "plain", single)),
    }


def run(
    rounds: int, work: Path, baseline: Path | None = None, dtype: str = "float32", runtime: str = "torch", quick: bool = False
) -> dict[str, Any]:
    """quick: a smoke run of the same steps on a fifth of the workloads (figures too small to read)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    model_dir = build_minilm_tiny_cross_encoder(work / "tiny-ce")
    words = vocabulary(model_dir)
    big = big_request(words, 200 if quick else 1000)
    small = small_requests(words, 16 * (3 if quick else 15), 20)
    single = [Request(r.query, r.documents[:1]) for r in small[: 20 if quick else 100]]
    out: dict[str, Any] = {"machine": cpu_model_name(), "cores": len(os.sched_getaffinity(0)), "rounds": [], "baseline": []}
    out["dtype"] = dtype
    gateways = {"gateway": _gateway(model_dir, work, http_load.ROOT, "gateway", dtype, runtime)}
    if baseline is not None:
        gateways["baseline"] = _gateway(model_dir, work, baseline, "baseline", dtype, runtime)
        out["baseline_root"] = str(baseline)
    try:
        for gw in gateways.values():
            gw.wait_ready()
            http_load.closed_loop(gw.base, "plain", small[:32], 16)  # warm the HTTP path
            http_load.big(gw.base, "plain", big)
        models = {m["id"]: m for m in gateways["gateway"].models()}
        out["plain_budget"] = models["plain"]["max_batch_tokens"]
        out["runtime"] = models["plain"].get("runtime", runtime)
        torch.set_num_threads(1)
        loop = Loop(model_dir, out["plain_budget"])
        loop.score(big.query, big.documents[:50])
        for k in range(rounds):
            t = time.perf_counter()
            for _ in range(BIG_REPEATS):
                loop.score(big.query, big.documents)
            loop_rate = BIG_REPEATS * len(big.documents) / (time.perf_counter() - t)
            # Mirrored order round to round, so a drift in the machine's load hits both alike.
            for name in (list(gateways) if k % 2 == 0 else list(gateways)[::-1]):
                row = {"loop_pairs_per_s": loop_rate, **_measure(gateways[name], big, small, single)}
                out["rounds" if name == "gateway" else "baseline"].append(row)
                print(f"round {k + 1}/{rounds} {name}: {summary_line(row)}", file=sys.stderr, flush=True)
    finally:
        for gw in gateways.values():
            gw.close()
    return out


def summary_line(row: dict[str, Any]) -> str:
    b, p, s = row["big"], row["c16_plain"], row["c16_b16k"]
    return (
        f"loop {row['loop_pairs_per_s']:.0f} pairs/s; big {b['pairs_per_s']:.0f} ({b['pairs_per_s'] / row['loop_pairs_per_s']:.2f}x loop, "
        f"tokenize {b['tokenize_ms']:.0f} ms); c16 plain {p['pairs_per_s']:.0f} pairs/s ({p['pairs_per_s'] / b['pairs_per_s']:.2f}x big) "
        f"p50 {p['p50_s'] * 1000:.0f} ms p99 {p['p99_s'] * 1000:.0f} ms ({p['p99_s'] / p['p50_s']:.1f}x); "
        f"c16 16k {s['pairs_per_s']:.0f} p50 {s['p50_s'] * 1000:.0f} p99 {s['p99_s'] * 1000:.0f} ({s['p99_s'] / s['p50_s']:.1f}x)"
    )


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Host path, tiny cross-encoder (2 x 32), {res['machine']}, {res['cores']} cores; gateway dtype {res['dtype']}, runtime {res.get('runtime', 'torch')}, "
        f"plain budget {res['plain_budget']} tokens",
        "",
        "| round | loop pairs/s | big pairs/s | big / loop | c16 plain pairs/s | c16 / big | p50 ms | p99 ms | p99/p50 | c16 16k pairs/s | p50 ms | p99 ms | p99/p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(res["rounds"], 1):
        b, p, s = r["big"], r["c16_plain"], r["c16_b16k"]
        lines.append(
            f"| {k} | {r['loop_pairs_per_s']:.0f} | {b['pairs_per_s']:.0f} | {b['pairs_per_s'] / r['loop_pairs_per_s']:.2f} | "
            f"{p['pairs_per_s']:.0f} | {p['pairs_per_s'] / b['pairs_per_s']:.2f} | {p['p50_s'] * 1000:.0f} | {p['p99_s'] * 1000:.0f} | "
            f"{p['p99_s'] / p['p50_s']:.2f} | {s['pairs_per_s']:.0f} | {s['p50_s'] * 1000:.0f} | {s['p99_s'] * 1000:.0f} | {s['p99_s'] / s['p50_s']:.2f} |"
        )
    lines += [
        "",
        "Where the server's CPU goes (all threads of the process; medians over the rounds):",
        "",
        "| workload | server CPU ms / pair | ms / request | of which event loop + small lane / streams / bulk lane | pairs / batch | padding | forward ms / batch (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in ("rounds", "baseline"):
        for key in ("big", "c16_plain", "c16_b16k", "one_doc"):
            costs = [r[key]["server"] for r in res[side] if "server" in r[key]]
            if costs:
                med = {k: statistics.median(c[k] for c in costs) for k, v in costs[0].items() if isinstance(v, (int, float))}
                split = " / ".join(f"{statistics.median(c['cpu_ms_per_request_by_threads'][k] for c in costs):.1f}"
                                   for k in costs[0]["cpu_ms_per_request_by_threads"])
                label = key if side == "rounds" else f"{key} (baseline)"
                lines.append(f"| {label} | {med['cpu_ms_per_pair']:.3f} | {med['cpu_ms_per_request']:.2f} | {split} | {med['pairs_per_batch']:.1f} | "
                             f"{med['padding']:.2f} | {med['forward_ms_per_batch']:.1f} |")
    lines += step_table({w: [r[w] for r in res["rounds"]] for w in ("big", "c16_plain", "c16_b16k")})
    ratios = [r["big"]["pairs_per_s"] / r["loop_pairs_per_s"] for r in res["rounds"]]
    lines += ["", f"big / loop: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})"]
    if res["baseline"]:
        lines += ["", f"Baseline {res['baseline_root']}, side by side (same rounds):", ""]
        for key, label in (("big", "big pairs/s"), ("c16_plain", "c16 plain pairs/s"), ("c16_b16k", "c16 16k pairs/s")):
            new = [r[key]["pairs_per_s"] for r in res["rounds"]]
            old = [r[key]["pairs_per_s"] for r in res["baseline"]]
            paired = [a / b for a, b in zip(new, old)]
            lines.append(f"- {label}: {statistics.median(new):.0f} vs {statistics.median(old):.0f}, paired ratio median "
                         f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f})")
        for key in ("c16_plain", "c16_b16k"):
            old = res["baseline"]
            lines.append(f"- baseline {key} p99/p50: " + ", ".join(f"{r[key]['p99_s'] / r[key]['p50_s']:.1f}" for r in old)
                         + "; big / loop: " + ", ".join(f"{r['big']['pairs_per_s'] / r['loop_pairs_per_s']:.2f}" for r in old))
    return "\n".join(lines)


def step_table(workloads: dict[str, list[dict[str, Any]]]) -> list[str]:
    """A batch's steps on its inference thread (engine.step_time, as http_load.costed reads them), wall / CPU
    ms a batch, medians over each workload's runs: a row per workload."""
    per = {name: [run["server"].get("step_ms_per_batch") or {} for run in runs] for name, runs in workloads.items()}
    steps = list(dict.fromkeys(step for runs in per.values() for run in runs for step in run))
    if not steps:
        return []
    lines = ["", "A batch's steps on its inference thread, wall / CPU ms (medians over the rounds; wall holds the waits):", "",
             "| workload | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
    for name, runs in per.items():
        cells = []
        for step in steps:
            both = [run[step] for run in runs if step in run]
            cells.append(f"{statistics.median(b[0] for b in both):.2f} / {statistics.median(b[1] for b in both):.2f}" if both else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, help="working folder (model, logs); a temporary one by default")
    ap.add_argument("--baseline", type=Path, help="a checkout of another commit to measure side by side")
    ap.add_argument("--dtype", default="float32", help="the gateway entries' dtype (auto: what a plain entry gets)")
    ap.add_argument("--runtime", default="torch", help="the gateway entries' runtime (torch: the loop's eager forward; auto: the default)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: a fifth of the workloads")
    args = ap.parse_args(argv)
    return run_and_report(
        lambda work: run(args.rounds, work, args.baseline, args.dtype, args.runtime, args.quick), args.work, args.json, markdown
    )


if __name__ == "__main__":
    sys.exit(main())
