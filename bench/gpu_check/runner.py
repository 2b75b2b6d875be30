"""Runs the GPU check's sections one after another, each in a process of its own with its own time limit,
under one deadline for the whole run; writes the JSON and the markdown after every section.

Sections are ordered most valuable first; one that would start with too little time left is skipped and
says so. A section killed at its limit keeps what it recorded (its part file) and takes its gateway with it
(the child leads a process group of its own).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.gpu_check import report
from bench.gpu_check.plan import Plan, gpu_plan, smoke_plan
from bench.gpu_check.record import write_json
from bench.gpu_check.wheels import COMMIT_FILE, tree_commit

ROOT = Path(__file__).resolve().parent.parent.parent
# The limit for one whole run on one GPU, model builds included.
GPU_BUDGET_S = 480
SMOKE_BUDGET_S = 900
REPORT_RESERVE_S = 8
# A section is not started with less than this left (seconds): it could only time out.
MIN_START_S = {"gpu": 25, "smoke": 8}


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    limit_s: int  # on the GPU; the smoke run gets SMOKE_LIMIT_S each
    estimate_s: int  # expected on an H200: a guess until a GPU run of this check (the report prints both)


SECTIONS = [
    # The first section pays the machine's cold start: the first import of torch and CUDA's context and
    # libraries on a freshly started VM (the runner itself never imports torch). A limit, not a reservation.
    Section("ceilings", "a. Ceilings of the card (matmul, copy)", 90, 10),
    Section("http_bge", "c. Gateway over HTTP, bge shape", 150, 70),
    Section("qwen3_gateway", "f. Qwen3-4B nf4 through the gateway", 150, 90),
    Section("qwen3_official", "f. Qwen3-4B nf4 through the official code", 100, 45),
    Section("peers", "d. In-process peers, bge shape", 150, 80),
    Section("table_encoders", "b. Memory/speed table: XLM-R large, GTE", 90, 35),
    Section("t4_gte", "e. GTE under a T4-like cap", 110, 45),
    Section("parity", "g. Padded vs packed scores", 90, 35),
    Section("table_qwen3", "b. Memory/speed table: Qwen3-4B nf4", 90, 45),
    # Last: a diagnosis of the concurrent-clients figures, not a figure of the issue.
    Section("event_loop", "h. The event loop's cost per small request", 60, 25),
]
SMOKE_LIMIT_S = 240


def _gpu_present() -> bool:
    """nvidia-smi -L, else torch in a child process (an image may lack the tool; the child keeps this
    process, which only supervises the sections, from holding a CUDA context on the card)."""
    probes = [[sys.executable, "-c", "import torch; print('GPU' if torch.cuda.is_available() else '')"]]
    if shutil.which("nvidia-smi"):
        probes.insert(0, ["nvidia-smi", "-L"])
    for probe in probes:
        try:
            if "GPU" in subprocess.run(probe, capture_output=True, text=True, timeout=60).stdout:
                return True
        except (subprocess.SubprocessError, OSError):
            continue
    return False


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "tokenizers", "bitsandbytes", "sentence-transformers", "FlagEmbedding", "litestar", "msgspec", "uvicorn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _meta(plan: Plan, budget_s: float) -> dict[str, Any]:
    from core.host import cpu_model_name

    commit = tree_commit()
    if commit == "unknown":
        # The device machine gets a copy of the tree without .git: the command may name the commit, else
        # `make gpu-wheels` wrote it beside the wheels.
        commit = os.environ.get("GPU_CHECK_COMMIT") or (COMMIT_FILE.read_text().strip() if COMMIT_FILE.exists() else "unknown")
    gpu = ""
    if shutil.which("nvidia-smi"):
        try:
            gpu = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip()
        except (subprocess.SubprocessError, OSError):
            pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "mode": "smoke" if plan.smoke else "gpu",
        "commit": commit, "gpu": gpu or "none", "cpu": cpu_model_name(),
        "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "versions": _versions(),
        "budget_s": budget_s,
    }


# Process groups of the sections running now. The runner's own SIGTERM (`timeout` around it) ends them:
# they lead sessions of their own, and a process left in its own session outlives the device tool's command.
_ACTIVE: set[int] = set()


class Stopped(Exception):
    """The runner was told to stop (SIGTERM / SIGINT)."""


def _on_signal(signum: int, frame: Any) -> None:
    for pgid in list(_ACTIVE):
        _kill_group(pgid, signal.SIGKILL)
    raise Stopped(signal.Signals(signum).name)


def _run_section(section: Section, plan: Plan, limit: float, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    parts, logs = work / "parts", work / "logs"
    parts.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    plan_path, ctx_path, part = work / "plan.json", work / "context.json", parts / f"{section.name}.json"
    plan_path.write_text(plan.to_json())
    write_json(ctx_path, ctx)
    part.unlink(missing_ok=True)
    log_path = logs / f"section-{section.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.gpu_check.section", section.name, "--plan", str(plan_path), "--part", str(part), "--context", str(ctx_path)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        _ACTIVE.add(child.pid)
        timed_out = False
        try:
            rc = child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(child.pid, signal.SIGTERM)
            try:
                rc = child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _kill_group(child.pid, signal.SIGKILL)
                rc = child.wait()
        finally:
            # Whatever the section left behind (a gateway it could not close) goes with it.
            _kill_group(child.pid, signal.SIGKILL)
            _ACTIVE.discard(child.pid)
    seconds = time.perf_counter() - start
    try:
        data = json.loads(part.read_text())
    except (OSError, ValueError):
        data = {"result": {}, "errors": {}, "steps": {}}
    errors = data.get("errors", {})
    if timed_out:
        status = "timeout"
    elif rc != 0:
        status = "error"
    else:
        status = "partial" if errors else "ok"
    out = {
        "title": section.title, "status": status, "seconds": round(seconds, 1), "limit_s": round(limit, 1),
        "estimate_s": section.estimate_s, "result": data.get("result", {}), "errors": errors, "steps": data.get("steps", {}),
    }
    if status != "ok":
        out["log_tail"] = log_path.read_text(errors="replace")[-2000:]
    return out


def _stopped(section: Section, work: Path, started: float, why: str) -> dict[str, Any]:
    """What a section had recorded when the whole run was stopped."""
    try:
        data = json.loads((work / "parts" / f"{section.name}.json").read_text())
    except (OSError, ValueError):
        data = {}
    return {
        "title": section.title, "status": "stopped", "seconds": round(time.perf_counter() - started, 1), "limit_s": 0,
        "estimate_s": section.estimate_s, "result": data.get("result", {}), "errors": data.get("errors", {}),
        "steps": data.get("steps", {}), "note": f"the run got {why}",
    }


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _write(out_json: Path, out_md: Path, doc: dict[str, Any]) -> str:
    write_json(out_json, doc)
    try:
        text = report.render(doc)
    except Exception as exc:  # noqa: BLE001 - a report bug must not cost the run its results: the JSON has them
        import traceback

        traceback.print_exc()
        text = f"# GPU check\n\nThe markdown could not be rendered ({type(exc).__name__}: {exc}); {out_json} holds every result."
    out_md.write_text(text + "\n")
    return text


def _archive_logs(work: Path, dest: Path) -> None:
    """The sections' and gateways' logs, each cut to its last 200 KB, in one file beside the report."""
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted((work / "logs").glob("*.log")):
            data = path.read_bytes()[-200_000:]
            info = tarfile.TarInfo(path.name)
            info.size = len(data)

            tar.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every section on this CPU with the tests' tiny models (proves the script)")
    ap.add_argument("--sections", help=f"comma-separated, run in the order given (default: all, most valuable first: {','.join(s.name for s in SECTIONS)})")
    ap.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS", help="override one section's time limit")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override a workload size of the plan (bench/gpu_check/plan.py), e.g. big_docs=[1000,5000]")
    ap.add_argument("--budget-s", type=float, help=f"deadline for the whole run (default {GPU_BUDGET_S} on a GPU, {SMOKE_BUDGET_S} smoke)")
    ap.add_argument("--work", type=Path, help="checkpoints, logs, part files (default /tmp/gpu-check[-smoke]; kept between runs)")
    ap.add_argument("--out", type=Path, help="folder for the report (default $OUT, else bench/results)")
    args = ap.parse_args(argv)

    if not args.smoke and not _gpu_present():
        print("no NVIDIA GPU here (nvidia-smi -L, torch.cuda): run with --smoke for the CPU proof run", file=sys.stderr)
        return 2
    work = (args.work or Path("/tmp/gpu-check-smoke" if args.smoke else "/tmp/gpu-check")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("logs", "parts", "modules"):
        shutil.rmtree(work / stale, ignore_errors=True)
    plan = smoke_plan(work) if args.smoke else gpu_plan(work)
    if args.set:
        fields = json.loads(plan.to_json())
        for item in args.set:
            key, _, value = item.partition("=")
            if key not in fields or key in ("smoke", "work"):
                ap.error(f"--set {key}: not a workload field of the plan")
            fields[key] = json.loads(value)
        plan = Plan.from_json(json.dumps(fields))
    budget = args.budget_s or (SMOKE_BUDGET_S if args.smoke else GPU_BUDGET_S)
    limits = {k: float(v) for k, v in (item.split("=", 1) for item in args.limit)}
    wanted = args.sections.split(",") if args.sections else [s.name for s in SECTIONS]
    unknown = set(wanted) - {s.name for s in SECTIONS}
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    by_name = {s.name: s for s in SECTIONS}
    chosen = [by_name[name] for name in dict.fromkeys(wanted)]  # the order asked for

    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu-check-smoke" if args.smoke else "gpu-check"
    if not os.environ.get("OUT") and args.out is None:
        stem += "-" + datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out_json, out_md, out_logs = out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}-logs.tar.gz"

    start = time.perf_counter()
    deadline = start + budget
    doc: dict[str, Any] = {"meta": _meta(plan, budget), "plan": json.loads(plan.to_json()), "sections": {}}
    ctx: dict[str, Any] = {}
    mode = "smoke" if args.smoke else "gpu"
    print(f"gpu_check ({mode}): {len(chosen)} sections, deadline {budget:.0f} s; report -> {out_md}", flush=True)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    stopped = None
    for section in chosen:
        if stopped:
            break
        left = deadline - time.perf_counter() - REPORT_RESERVE_S
        limit = min(limits.get(section.name, SMOKE_LIMIT_S if args.smoke else section.limit_s), left)
        if limit < MIN_START_S[mode]:
            doc["sections"][section.name] = {"title": section.title, "status": "skipped", "seconds": 0, "limit_s": 0,
                                             "estimate_s": section.estimate_s, "result": {}, "errors": {},
                                             "steps": {}, "note": f"not started: {max(left, 0):.0f} s left of the run's {budget:.0f} s"}
            print(f"  {section.name}: skipped ({max(left, 0):.0f} s left)", flush=True)
            continue
        print(f"  {section.name}: running (limit {limit:.0f} s) ...", flush=True)
        started = time.perf_counter()
        try:
            out = _run_section(section, plan, limit, work, ctx)
        except Stopped as exc:
            stopped = str(exc)
            out = _stopped(section, work, started, stopped)
        doc["sections"][section.name] = out
        ctx[section.name] = out["result"]
        doc["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
        _write(out_json, out_md, doc)
        errors = "; ".join(f"{k}: {v}" for k, v in out["errors"].items())[:300]
        print(f"  {section.name}: {out['status']} in {out['seconds']:.0f} s{(' - ' + errors) if errors else ''}", flush=True)
    doc["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    if stopped:
        doc["meta"]["stopped"] = f"the run got {stopped} and stopped"
    text = _write(out_json, out_md, doc)
    try:
        _archive_logs(work, out_logs)
    except OSError as exc:
        print(f"logs not archived: {exc}", file=sys.stderr)
    print(f"\nwrote {out_json}, {out_md}, {out_logs}\n", flush=True)
    print(text, flush=True)
    return 0 if all(s["status"] == "ok" for s in doc["sections"].values()) else 1
