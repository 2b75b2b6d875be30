"""One section of the GPU check in a process of its own (started by bench.gpu_check.runner):

    python -m bench.gpu_check.section NAME --plan PLAN.json --part PART.json --context CONTEXT.json

Its results go to PART.json after every step (bench.gpu_check.record), so the runner keeps them when the
section fails, or is killed at its time limit together with the gateway it started (one process group).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

# name -> (module, function(rec, plan, ctx))
FUNCTIONS = {
    "ceilings": ("bench.gpu_check.ceilings", "run"),
    "http_bge": ("bench.gpu_check.over_http", "http_bge"),
    "qwen3_gateway": ("bench.gpu_check.over_http", "qwen3_gateway"),
    "qwen3_official": ("bench.gpu_check.in_process", "qwen3_official"),
    "peers": ("bench.gpu_check.in_process", "peers"),
    "table_encoders": ("bench.gpu_check.table", "encoders"),
    "t4_gte": ("bench.gpu_check.over_http", "t4_gte"),
    "parity": ("bench.gpu_check.over_http", "parity"),
    "table_qwen3": ("bench.gpu_check.table", "qwen3"),
    "event_loop": ("bench.gpu_check.event_loop", "run"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=sorted(FUNCTIONS))
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--part", type=Path, required=True)
    ap.add_argument("--context", type=Path, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from bench.gpu_check.plan import Plan
    from bench.gpu_check.record import Recorder
    from bench.gpu_check.serve import record_modules

    plan = Plan.from_json(args.plan.read_text())
    atexit.register(record_modules, str(Path(plan.work) / "modules" / f"section-{args.name}.txt"))
    ctx = json.loads(args.context.read_text()) if args.context.exists() else {}
    rec = Recorder(args.part)
    module, function = FUNCTIONS[args.name]
    try:
        getattr(importlib.import_module(module), function)(rec, plan, ctx)
    except Exception as exc:  # noqa: BLE001 - recorded; the runner reports it and goes on
        traceback.print_exc()
        rec.error("section", exc)
        return 1
    rec.data["done"] = True
    rec.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
