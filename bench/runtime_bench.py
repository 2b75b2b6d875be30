"""CPU runtimes benchmark: the gateway on each runtime against sentence-transformers' CrossEncoder on its
torch, ONNX (int8) and OpenVINO backends, on the benchmark's model and 1,000-document request.

    python -m bench.runtime_bench                    # ~10 min on 2 cores
    python -m bench.runtime_bench --docs 200 --rounds 1 --systems gw-auto,st-openvino-sorted   # a subset
    python -m bench.runtime_bench --baseline /tmp/old   # each gw-* system also from another commit's checkout

Systems, each in its own process, all on bench/models.py's MiniLM-L6 cross-encoder:
  base:gw-<...>                    with --baseline: the same gateway system run from that checkout's code
  st-<backend>-<sorted|unsorted>  CrossEncoder.predict in-process (bench/st_worker.py) in a venv of its own
                                  (optimum-onnx / optimum-intel pin transformers < 4.58; made on first run)
  gw-<runtime>                    `rerank-gateway serve` over HTTP, the model's registry entry as a new user
                                  writes it (no profile, runtime auto, no quantization), or that entry with
                                  one runtime / `quantization: int8` set
Every system scores the same request; scores are compared with torch float32 (the gateway's `flag`
backend with runtime torch and dtype float32, run here once): max |diff| and Spearman. Rounds interleave
the systems, mirrored every other round; ratios are medians of within-round ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.http_load import serve_module
from core.host import cpu_model_name

ROOT = Path(__file__).resolve().parent.parent
ST_VENV = Path(os.environ.get("RERANK_BENCH_ST_VENV", ROOT / ".venv-bench-st"))
ST_REQUIREMENTS = ["torch==2.13.0", "sentence-transformers[onnx,openvino]>=5", "onnxruntime==1.31.1", "openvino==2026.4.1"]
ST_SYSTEMS = [f"st-{b}-{o}" for b in ("torch-bf16", "onnx-int8", "openvino") for o in ("sorted", "unsorted")]
GATEWAYS = {
    "gw-auto": {},
    "gw-torch": {"runtime": "torch"},
    "gw-openvino": {"runtime": "openvino"},
    "gw-onnxruntime": {"runtime": "onnxruntime"},
    "gw-int8": {"quantization": "int8"},
    # The same entry with the cpu profile registry.yaml gives its CPU models (1,024-token batches).
    "gw-auto-cpu1024": {"profiles": {"cpu": {"max_batch_tokens": 1024}}},
    "gw-int8-cpu1024": {"quantization": "int8", "profiles": {"cpu": {"max_batch_tokens": 1024}}},
    # One CPU stream on all cores: OpenVINO then runs each batch on both threads, as CrossEncoder does.
    "gw-openvino-1stream": {"runtime": "openvino", "cpu_streams": 1},
    "gw-openvino-1stream-cpu1024": {"runtime": "openvino", "cpu_streams": 1, "profiles": {"cpu": {"max_batch_tokens": 1024}}},
}
MODEL_ID = "bench-ce"


def ensure_st_venv() -> Path:
    python = ST_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ST_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", ST_REQUIREMENTS[0]], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *ST_REQUIREMENTS[1:]], check=True)
    return python


def env(root: Path = ROOT) -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [e.get("PYTHONPATH")])])
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StWorker:
    def __init__(self, name: str, model_dir: Path, work: Path) -> None:
        backend, self.sorted = name.removeprefix("st-").rsplit("-", 1)
        self.sorted = self.sorted == "sorted"
        self.log = open(work / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            [str(ensure_st_venv()), "-m", "bench.st_worker", backend, str(model_dir), str(work)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env(), cwd=ROOT,
        )
        self.label = ""

    def wait_ready(self) -> None:
        self.label = json.loads(self._line())["label"] + (", sorted" if self.sorted else ", unsorted")

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited (see {self.log.name})")
        return line

    def score(self, docs: int) -> dict:
        self.proc.stdin.write(json.dumps({"docs": docs, "sorted": self.sorted}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


class GatewayProcess:
    def __init__(self, name: str, model_dir: Path, work: Path, fields: dict, root: Path = ROOT) -> None:
        self.name = name
        self.port = free_port()
        registry = work / f"{name.replace(':', '-')}.yaml"
        entry = {"backend": "flag", "source": str(model_dir), "max_length": 512, "load": "eager", **fields}
        registry.write_text(json.dumps({"default_model": MODEL_ID, "server": {"request_timeout_s": 600},
                                        "models": {MODEL_ID: entry}}))
        self.log = open(work / f"{name.replace(':', '-')}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", serve_module(root), "serve", "--registry", str(registry), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env(root), cwd=root,
        )
        self.label = ""

    def wait_ready(self, timeout_s: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited (see {self.log.name})")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=2).status_code == 200:
                    model = httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=5).json()["data"][0]
                    if model["state"] != "ready":
                        raise RuntimeError(f"model {model['state']}: {model.get('reason')}")
                    self.label = (f"rerank-gateway over HTTP ({self.name}), {model.get('runtime', model['dtype'])}, "
                                  f"{model['max_batch_tokens']}-token batches")
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("gateway not ready")

    def score(self, docs: list[str], query: str) -> dict:
        import httpx

        start = time.perf_counter()
        resp = httpx.post(f"http://127.0.0.1:{self.port}/v1/rerank", json={"model": MODEL_ID, "query": query, "documents": docs}, timeout=900)
        seconds = time.perf_counter() - start
        resp.raise_for_status()
        scores = [0.0] * len(docs)
        for r in resp.json()["results"]:
            scores[r["index"]] = r["relevance_score"]
        return {"seconds": seconds, "pairs": len(docs), "scores": scores}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def reference_scores(model_dir: Path, query: str, docs: list[str]) -> list[float]:
    """torch float32 through the gateway's own flag backend, in this process."""
    import torch

    from backends.flag import FlagBackend
    from core.config import effective, model_spec

    spec = model_spec(backend="flag", source=str(model_dir), max_length=512, dtype="float32", runtime="torch")
    backend = FlagBackend("ref", spec, effective(spec, "cpu"))
    backend.load()
    prepared = backend.prepare(query, docs, max_length=512, max_chunks=1, instruction=None)
    order = sorted(range(prepared.n_items), key=lambda i: int(prepared.lengths[i]))
    out = torch.empty(len(docs))
    with torch.inference_mode():
        for k in range(0, len(order), 32):
            rows = order[k : k + 32]
            raw = backend.forward(backend.collate(prepared.rows(rows)))
            out[torch.tensor(rows)] = backend.relevance(raw)
    return out.tolist()


def agreement(ref: list[float], other: list[float]) -> dict[str, float]:
    def ranks(xs: list[float]) -> list[int]:
        r = [0] * len(xs)
        for k, i in enumerate(sorted(range(len(xs)), key=xs.__getitem__)):
            r[i] = k
        return r

    a, b = ranks(ref), ranks(other)
    n = len(a)
    d2 = sum((x - y) ** 2 for x, y in zip(a, b))
    return {"max_abs_diff": max(abs(x - y) for x, y in zip(ref, other)), "spearman": 1 - 6 * d2 / (n * (n * n - 1))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--systems", default=",".join([*GATEWAYS, *ST_SYSTEMS]))
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "rerank-bench-minilm-ce"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit: its gw-* systems run in the same rounds as base:gw-*")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.models import build_minilm_cross_encoder
    from bench.workload import big_request, vocabulary

    model_dir = build_minilm_cross_encoder(Path(args.model_dir))
    req = big_request(vocabulary(model_dir), args.docs)
    out = Path(args.out)
    work = out / "runtime_logs"
    work.mkdir(parents=True, exist_ok=True)
    names = [s for s in args.systems.split(",") if s]
    if args.baseline is not None:
        names += [f"base:{n}" for n in names if n in GATEWAYS]
    systems: dict[str, object] = {}
    try:
        # One at a time: `runtime: auto` measures its candidates at start, which the others' exports would disturb.
        for name in names:
            gateway, root = name.removeprefix("base:"), (args.baseline.resolve() if name.startswith("base:") else ROOT)
            s = systems[name] = GatewayProcess(name, model_dir, work, GATEWAYS[gateway], root) if gateway in GATEWAYS else StWorker(name, model_dir, work)
            s.wait_ready()
        reference = reference_scores(model_dir, req.query, req.documents)
        # Warm-up: one small call each.
        for s in systems.values():
            s.score(req.documents[:32], req.query) if isinstance(s, GatewayProcess) else s.score(32)
        rates: dict[str, dict[int, float]] = {n: {} for n in names}
        agree: dict[str, dict] = {}
        load_before = os.getloadavg()[0]
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                s = systems[name]
                res = s.score(req.documents, req.query) if isinstance(s, GatewayProcess) else s.score(args.docs)
                rates[name][rnd] = res["pairs"] / res["seconds"]
                agree[name] = agreement(reference, res["scores"])
                print(f"round {rnd + 1}: {name}: {rates[name][rnd]:.1f} pairs/s", file=sys.stderr, flush=True)
        load_after = os.getloadavg()[0]
        labels = {n: s.label for n, s in systems.items()}
    finally:
        for s in systems.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass

    def ratio(a: str, b: str) -> float | None:
        if a not in rates or b not in rates:
            return None
        return statistics.median(rates[a][r] / rates[b][r] for r in rates[a] if r in rates[b])

    best_unquantized = [n for n in ("st-torch-bf16-sorted", "st-openvino-sorted") if n in rates]
    targets = {}
    if "gw-auto" in rates and best_unquantized:
        targets["gateway default (auto) / best unquantized in-process CrossEncoder, sorted"] = (
            min(ratio("gw-auto", n) for n in best_unquantized), 1.1)
    if "gw-int8" in rates and "st-onnx-int8-sorted" in rates:
        targets["gateway int8 / CrossEncoder ONNX int8, sorted"] = (ratio("gw-int8", "st-onnx-int8-sorted"), 1.1)
    for name in ("gw-auto-cpu1024", "gw-int8-cpu1024"):
        ref = "st-onnx-int8-sorted" if "int8" in name else None
        if name in rates and (ref in rates if ref else best_unquantized):
            value = ratio(name, ref) if ref else min(ratio(name, n) for n in best_unquantized)
            targets[f"{name} (cpu profile) / {ref or 'best unquantized CrossEncoder'}, sorted"] = (value, 1.1)
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.runtime_bench", *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "load_average_before_after": [load_before, load_after],
        "docs": args.docs,
        "rounds": args.rounds,
        "systems": {n: {"label": labels[n], "pairs_per_s": statistics.median(rates[n].values()),
                        "pairs_per_s_rounds": rates[n], **agree[n]} for n in names},
        "targets": {k: {"measured": v, "wanted": w, "met": v >= w} for k, (v, w) in targets.items()},
        # Each gateway's pairs/s over the same system from the baseline checkout, paired per round.
        "over_baseline": {n: ratio(n, f"base:{n}") for n in names if f"base:{n}" in rates},
        "baseline": str(args.baseline.resolve()) if args.baseline is not None else None,
    }
    (out / "runtime_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["| system | pairs/s | max abs diff vs torch fp32 | Spearman vs torch fp32 |", "| --- | ---: | ---: | ---: |"]
    for n, r in res["systems"].items():
        lines.append(f"| {r['label']} | {r['pairs_per_s']:.1f} | {r['max_abs_diff']:.4f} | {r['spearman']:.4f} |")
    lines += ["", "| target | measured | wanted | met |", "| --- | ---: | ---: | --- |"]
    for k, t in res["targets"].items():
        lines.append(f"| {k} | {t['measured']:.2f} | >= {t['wanted']:g} | {'yes' if t['met'] else 'NO'} |")
    if res["over_baseline"]:
        lines += ["", f"| system | pairs/s over the same system from {res['baseline']} |", "| --- | ---: |"]
        lines += [f"| {n} | {v:.2f} |" for n, v in res["over_baseline"].items()]
    lines.append(f"\n{res['date']} · {res['cpu']}, {res['cores']} cores · {args.docs} documents, {args.rounds} interleaved rounds · "
                 f"load average {load_before:.1f} -> {load_after:.1f}")
    (out / "runtime_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
