"""The host path in front of a simulated fast device: the GPU regime on a CPU, with no GPU and no model cost.

bench.host_path stands in for a GPU with a tiny model whose forward is "nearly free", but on a 2-core
machine that forward still takes about 60% of the process's CPU (ONNX Runtime or OpenVINO), so its figures
say how the host's work and the forward share two cores, not how the host feeds a device. Here the gateway
serves the same tiny cross-encoder with its forward replaced by a simulated device, inside the gateway
process (bench/simulated_device.py: ops.cli with the forward patched, and the engine's rules that follow
where the forward runs taken as on a GPU, bulk batches bounded by device time while searches arrive):

- launch: the inference thread holds the GIL for LAUNCH_MS of Python a batch, as an eager forward's kernel
  launches do (an XLM-R-large forward is some 500 launches);
- device: the batch then occupies one device shared by the inference threads, queued behind the batch
  before it, for its tokens / the device's rate (a padded batch's rows x width, a packed one's real
  tokens), plus --floor-ms whatever its size (default 0); the thread waits without the GIL, as a stream
  waits on its batch's event.

So the CPU does only the host's work (HTTP, JSON, tokenizing, batching, collation, answers), and how busy
the device is says whether the host keeps up: device busy = the batches' device time (/metrics, which
times them as CUDA events would) / wall. Entries run with a GPU-like token budget (BUDGET) and two
inference threads, as on a GPU.

Cases, MODE:RATE: `packed` (padding_free, as bge-reranker-large runs on an Ampere or newer GPU) or `padded`
(Qwen3 anywhere, every model on a T4), at RATE tokens a second. 1,150,000 is what bge-reranker-large's shape
ran in warm-up on an H200 (padded, the first GPU run); 200,000 a device the host outruns. Workloads as
bench.host_path's: `big` (1,000 documents, BIG_REPEATS in a row) and `c16` (16 closed-loop clients x 20
documents); and as the GPU check's: `beside`, 3-document requests one at a time beside one request of
BESIDE_DOCS documents, against the same requests alone (p99 beside / p99 alone: issue 18 asks <= 3x).
Batches are timed by their device time, as CUDA events time them, so the measured rate bounds bulk batches
by time while searches arrive, as on a GPU.

    python -m bench.fast_device                              # ~1.5 min on 2 cores; markdown on stdout
    python -m bench.fast_device --cases padded:200000 --rounds 3 --json out.json
    python -m bench.fast_device --baseline /tmp/old          # another checkout, side by side
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import http_load
from bench.host_path import MAX_LENGTH, big_repeats, step_table
from bench.http_load import costed
from bench.report import run_and_report
from bench.simulated_device import FLOOR_ENV, LAUNCH_ENV, RATE_ENV
from bench.workload import Request, big_request, small_requests, vocabulary
from core.host import cpu_model_name
from engine.scheduler import SEARCH_RECENT_S

DEFAULT_CASES = "packed:1150000,padded:1150000,padded:200000"
# The GPU check's `beside` workload: 3-document requests beside one request of this many documents.
BESIDE_DOCS = 10000
ALONE_REQUESTS = 100
# Host time under the GIL a batch: ~500 kernel launches of an eager 24-layer encoder at a few microseconds.
LAUNCH_MS = 2.0
BUDGET = 16384
# The simulated_device module comes from here, after the measured checkout's own packages on the path.
SIM_DIR = Path(__file__).resolve().parent


def registry(model_dir: Path, mode: str, budget: int = BUDGET) -> dict[str, Any]:
    entry = {
        "backend": "flag", "source": str(model_dir), "max_length": MAX_LENGTH, "load": "eager", "runtime": "torch",
        "dtype": "float32", "max_batch_tokens": budget, "cpu_streams": 2, "padding_free": "on" if mode == "packed" else "off",
    }
    return {"default_model": "sim", "server": {"max_documents": 10000, "request_timeout_s": 600}, "models": {"sim": entry}}


def _measure(
    gw: http_load.GatewayProcess, big: Request, small: list[Request], beside_big: Request | None, threes: list[Request]
) -> dict[str, Any]:
    time.sleep(SEARCH_RECENT_S + 0.5)  # bench.host_path says why
    out = {
        "big": costed(gw, "sim", lambda: big_repeats(gw, "sim", big)),
        "c16": costed(gw, "sim", lambda: http_load.closed_loop(gw.base, "sim", small, 16)),
    }
    if beside_big is not None:
        alone = http_load.sequential(gw.base, "sim", threes[:ALONE_REQUESTS])
        time.sleep(SEARCH_RECENT_S + 0.5)  # the big request starts with full batches, as on a quiet server
        beside = costed(gw, "sim", lambda: http_load.beside_big(gw.base, "sim", beside_big, threes))
        out["beside"] = {"alone": alone, "beside": beside, "p99_ratio": beside["p99_s"] / alone["p99_s"], "big_docs": len(beside_big.documents)}
    return out


def run(
    cases: list[tuple[str, float]], rounds: int, work: Path, launch_ms: float, baseline: Path | None = None,
    docs: int = 1000, small_requests_n: int = 16 * 15, beside_docs: int = BESIDE_DOCS, floor_ms: float = 0.0,
    budget: int = BUDGET,
) -> dict[str, Any]:
    from tests.tiny_models import build_minilm_tiny_cross_encoder

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    model_dir = build_minilm_tiny_cross_encoder(work / "tiny-ce")
    words = vocabulary(model_dir)
    big, small = big_request(words, docs), small_requests(words, small_requests_n, 20)
    beside_big = big_request(words, beside_docs) if beside_docs else None
    threes = small_requests(words, 400, 3)
    roots = {"gateway": http_load.ROOT, **({"baseline": baseline} if baseline else {})}
    out: dict[str, Any] = {
        "machine": cpu_model_name(), "cores": len(os.sched_getaffinity(0)), "launch_ms": launch_ms, "floor_ms": floor_ms, "budget": budget,
        "cases": {}, "baseline_root": str(baseline) if baseline else None,
    }
    for mode, rate in cases:
        env = {RATE_ENV: str(rate), LAUNCH_ENV: str(launch_ms), FLOOR_ENV: str(floor_ms)}
        gateways = {
            name: http_load.GatewayProcess(
                registry(model_dir, mode, budget), work, name=f"{name}-{mode}-{rate:.0f}", module="simulated_device", root=root,
                env={**env, "PYTHONPATH": os.pathsep.join([str(root), str(SIM_DIR)])},
            )
            for name, root in roots.items()
        }
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in gateways}
        try:
            for gw in gateways.values():
                gw.wait_ready()
                http_load.closed_loop(gw.base, "sim", small[:32], 16)  # warm the HTTP path
                http_load.big(gw.base, "sim", big)
            for k in range(rounds):
                for name in list(gateways) if k % 2 == 0 else list(gateways)[::-1]:
                    row = _measure(gateways[name], big, small, beside_big, threes)
                    rows[name].append(row)
                    print(f"{mode} {rate:.0f} round {k + 1}/{rounds} {name}: {summary_line(row)}", file=sys.stderr, flush=True)
        finally:
            for gw in gateways.values():
                gw.close()
        out["cases"][f"{mode}:{rate:.0f}"] = rows
    return out


def summary_line(row: dict[str, Any]) -> str:
    b, c = row["big"], row["c16"]
    line = (
        f"big {b['pairs_per_s']:.0f} pairs/s (device busy {b['server']['device_busy']:.0%}); c16 {c['pairs_per_s']:.0f} pairs/s "
        f"({c['pairs_per_s'] / b['pairs_per_s']:.2f}x big, busy {c['server']['device_busy']:.0%}) p50 {c['p50_s'] * 1000:.0f} ms "
        f"p99 {c['p99_s'] * 1000:.0f} ms"
    )
    if "beside" in row:
        x = row["beside"]
        line += (
            f"; 3 docs p99 {x['alone']['p99_s'] * 1000:.0f} ms alone, {x['beside']['p99_s'] * 1000:.0f} ms beside "
            f"{x['big_docs']} docs ({x['p99_ratio']:.1f}x)"
        )
    return line


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Host path before a simulated device: the tiny cross-encoder's tokenizer, {res['machine']}, {res['cores']} cores; "
        f"budget {res['budget']} tokens, {res['launch_ms']:g} ms of launch under the GIL a batch, "
        f"{res.get('floor_ms', 0):g} ms of device a batch whatever its size",
        "",
        "| case | side | round | big pairs/s | big device busy | c16 pairs/s | c16 / big | c16 device busy | c16 p99/p50 | "
        "real / computed tokens big, c16 | host CPU ms / pair big, c16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, sides in res["cases"].items():
        for side, rows in sides.items():
            for k, r in enumerate(rows, 1):
                b, c = r["big"], r["c16"]
                lines.append(
                    f"| {case} | {side} | {k} | {b['pairs_per_s']:.0f} | {b['server']['device_busy']:.0%} | {c['pairs_per_s']:.0f} | "
                    f"{c['pairs_per_s'] / b['pairs_per_s']:.2f} | {c['server']['device_busy']:.0%} | {c['p99_s'] / c['p50_s']:.2f} | "
                    f"{b['server']['padding']:.2f}, {c['server']['padding']:.2f} | "
                    f"{b['server']['cpu_ms_per_pair']:.3f}, {c['server']['cpu_ms_per_pair']:.3f} |"
                )
    lines.append("")
    beside = [(case, side, k, r["beside"]) for case, sides in res["cases"].items() for side, rows in sides.items()
              for k, r in enumerate(rows, 1) if "beside" in r]
    if beside:
        lines += [
            "3-document requests alone and beside one big request (the device time of a batch: /metrics over the beside run):",
            "",
            "| case | side | round | big request docs, s | 3 docs p50 alone, beside ms | p99 alone, beside ms | p99 beside / alone | device ms / batch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for case, side, k, x in beside:
            a, b = x["alone"], x["beside"]
            lines.append(
                f"| {case} | {side} | {k} | {x['big_docs']}, {b['big_seconds']:.2f} | {a['p50_s'] * 1000:.1f}, {b['p50_s'] * 1000:.1f} | "
                f"{a['p99_s'] * 1000:.1f}, {b['p99_s'] * 1000:.1f} | {x['p99_ratio']:.2f} | {b['server']['forward_ms_per_batch']:.1f} |"
            )
        lines.append("")
    for case, sides in res["cases"].items():
        for side, rows in sides.items():
            ratios = [r["c16"]["pairs_per_s"] / r["big"]["pairs_per_s"] for r in rows]
            lines.append(
                f"- {case}, {side}: c16 / big median {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}); device busy "
                f"median big {statistics.median(r['big']['server']['device_busy'] for r in rows):.0%}, "
                f"c16 {statistics.median(r['c16']['server']['device_busy'] for r in rows):.0%}"
            )
            if all("beside" in r for r in rows):
                besides = [r["beside"]["p99_ratio"] for r in rows]
                lines.append(f"- {case}, {side}: 3-doc p99 beside / alone median {statistics.median(besides):.2f} ({min(besides):.2f}-{max(besides):.2f})")
        if len(sides) == 2:
            for key in ("big", "c16"):
                paired = [a[key]["pairs_per_s"] / b[key]["pairs_per_s"] for a, b in zip(sides["gateway"], sides["baseline"])]
                lines.append(f"- {case}, {key} pairs/s gateway / baseline, paired: median {statistics.median(paired):.2f} "
                             f"({min(paired):.2f}-{max(paired):.2f})")
    lines += step_table({f"{case} {w}": [r[w] for r in sides["gateway"]] for case, sides in res["cases"].items() for w in ("big", "c16")})
    return "\n".join(lines)


def parse_cases(text: str) -> list[tuple[str, float]]:
    cases = []
    for item in filter(None, text.split(",")):
        mode, _, rate = item.partition(":")
        if mode not in ("packed", "padded") or not rate:
            raise SystemExit(f"a case is packed:RATE or padded:RATE, not {item!r}")
        cases.append((mode, float(rate)))
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="MODE:RATE, comma-separated (MODE: packed | padded; RATE: tokens/s)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--launch-ms", type=float, default=LAUNCH_MS)
    ap.add_argument("--floor-ms", type=float, default=0.0, help="device time a batch costs whatever its size")
    ap.add_argument("--budget", type=int, default=BUDGET, help="the entries' max_batch_tokens")
    ap.add_argument("--docs", type=int, default=1000, help="documents of the big request")
    ap.add_argument("--small-requests", type=int, default=16 * 15, help="20-document requests of the 16 clients, in all")
    ap.add_argument("--beside-docs", type=int, default=BESIDE_DOCS, help="documents of the big request beside 3-document ones (0: no beside workload)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, help="working folder (model, logs); a temporary one by default")
    ap.add_argument("--baseline", type=Path, help="a checkout of another commit, side by side")
    args = ap.parse_args(argv)
    return run_and_report(
        lambda work: run(
            parse_cases(args.cases), args.rounds, work, args.launch_ms, args.baseline, args.docs,
            args.small_requests, args.beside_docs, args.floor_ms, args.budget,
        ),
        args.work, args.json, markdown,
    )


if __name__ == "__main__":
    sys.exit(main())
