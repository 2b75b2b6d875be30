"""Rerank benchmark: the gateway over HTTP against the libraries people call in-process today.

    make bench                       # full run (~5-10 min on 2 cores)
    python -m bench.rerank_bench --quick   # smoke run on a tiny workload

Systems, all on the same model directory (a MiniLM-L6 cross-encoder, bench/models.py):
  flag          FlagEmbedding FlagReranker.compute_score, fp32, in-process
  crossencoder  sentence-transformers CrossEncoder.predict, fp32, in-process
  ceiling       a plain length-sorted token-budget loop in the best dtype for this CPU, in-process
  gateway       `rerank-gateway serve` (backend `flag`) over real HTTP on loopback, a registry entry with
                NO profile (the gateway chooses the budget; the report says which and why)
  infinity      Infinity (infinity-emb 0.0.78) `v2 --engine torch --device cpu --dtype bfloat16
                --batch-size 32` over real HTTP, from its own virtualenv .venv-infinity (`make bench`
                creates it; it pins numpy and transformers older than the gateway's)

Workloads: one request of 1,000 documents of lognormal length (8..400 words), and 16 concurrent
closed-loop clients each sending 20-document requests. Every system runs in its own process, all of them
stay up, and the rounds interleave the systems, so drift in a shared machine's load hits them alike: the
ratios are what to read, the absolute figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.workload import Request, big_request, small_requests, vocabulary

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ["flag", "crossencoder", "ceiling"]
SYSTEMS = [*LIBRARIES, "gateway", "infinity"]
MODEL_ID = "bench-ce"


@dataclass
class Sizes:
    docs: int = 1000
    clients: int = 16
    docs_per_request: int = 20
    # Requests per client in one concurrent round; the in-process libraries serve one call at a time,
    # so fewer of their requests give the same statistics.
    requests_per_client: int = 4
    library_requests_per_client: int = 1
    # The gateway and the ceiling run every round; FlagReranker and CrossEncoder, ten times slower, run
    # the 1,000-document request in the first library_rounds rounds and the concurrent one in the first.
    rounds: int = 3
    library_rounds: int = 2


QUICK = Sizes(docs=64, clients=4, docs_per_request=8, requests_per_client=2, library_requests_per_client=1, rounds=1, library_rounds=1)
SLOW_LIBRARIES = ("flag", "crossencoder")


@dataclass
class Samples:
    """What one system did on one workload, over all rounds."""

    rounds: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall time of each round
    pairs: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    real_tokens: int = 0
    padded_tokens: int = 0
    cpu_seconds: list[float] = field(default_factory=list)  # the system's process CPU time, each round
    extra: dict[str, list[float]] = field(default_factory=dict)

    def add(self, rnd: int, seconds: float, pairs: int, latencies: list[float], real: int, padded: int) -> None:
        self.rounds.append(rnd)
        self.seconds.append(seconds)
        self.pairs.append(pairs)
        self.latencies.extend(latencies)
        self.real_tokens += real
        self.padded_tokens += padded

    def rates(self) -> dict[int, float]:
        """pairs/s by round."""
        return {r: p / s for r, p, s in zip(self.rounds, self.pairs, self.seconds)}

    def summary(self) -> dict[str, Any]:
        rates = self.rates()
        return {
            "pairs_per_s": statistics.median(rates.values()),
            "pairs_per_s_rounds": rates,
            "p50_ms": percentile(self.latencies, 50) * 1000,
            "p99_ms": percentile(self.latencies, 99) * 1000,
            "padding_efficiency": self.real_tokens / self.padded_tokens if self.padded_tokens else None,
            # Pairs per second of the system's own CPU time: on a machine other jobs share, wall-clock rates
            # follow the neighbours' load; this follows the system's own cost.
            "pairs_per_cpu_s": sum(self.pairs) / sum(self.cpu_seconds) if self.cpu_seconds and sum(self.cpu_seconds) else None,
            "pairs_per_cpu_s_rounds": {r: p / c for r, p, c in zip(self.rounds, self.pairs, self.cpu_seconds) if c},
            "requests": len(self.latencies),
            **{k: statistics.mean(v) for k, v in self.extra.items() if v},
        }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_bytes(pid: int) -> int:
    """A process's resident-set high-water mark (VmHWM)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


# -- in-process libraries, each in its own process ---------------------------------------------------------


class LibraryWorker:
    def __init__(self, name: str, model_dir: Path, log_dir: Path) -> None:
        self.name = name
        self.log = open(log_dir / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.systems", name, str(model_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=child_env(), cwd=ROOT,
        )
        self.label = ""

    def wait_ready(self) -> None:
        hello = self._read()
        self.label = hello["label"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited (see {self.log.name})")
        return json.loads(line)

    def call(self, **cmd: Any) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def peak_rss(self) -> int:
        return peak_rss_bytes(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# -- the servers, over HTTP --------------------------------------------------------------------------------


class HttpSystem:
    """A rerank server in a subprocess on a loopback port, driven over real HTTP with httpx. Both speak
    Cohere's rerank body ({model, query, documents} -> results [{index, relevance_score}])."""

    label = ""
    path = "/v1/rerank"
    ready_path = "/ready"
    model = MODEL_ID

    def _start(self, argv: list[str], work_dir: Path, name: str, env: dict[str, str]) -> None:
        self.log = open(work_dir / f"{name}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited with {self.proc.returncode} (see {self.log.name})")
            try:
                if httpx.get(f"{self.base}{self.ready_path}", timeout=2).status_code == 200:
                    self.on_ready()
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{type(self).__name__} not ready after {timeout_s:g} s (see {self.log.name})")

    def on_ready(self) -> None:
        pass

    def tokens(self) -> tuple[float, float] | None:
        """Lifetime (real, padded) tokens the model ran, when the server reports them."""
        return None

    async def _post(self, client: httpx.AsyncClient, req: Request, timings: dict[str, list[float]]) -> tuple[float, dict]:
        start = time.perf_counter()
        body = {"model": self.model, "query": req.query, "documents": req.documents, "return_documents": False}
        resp = await client.post(self.path, json=body)
        latency = time.perf_counter() - start
        if resp.status_code != 200:
            raise RuntimeError(f"{type(self).__name__} answered {resp.status_code}: {resp.text[:300]}")
        for header in ("x-queue-time", "x-tokenize-time", "x-inference-time"):
            if header in resp.headers:
                timings.setdefault(header.removeprefix("x-").replace("-", "_") + "_ms", []).append(float(resp.headers[header]))
        return latency, resp.json()

    def run_big(self, req: Request) -> tuple[dict, dict[str, list[float]]]:
        async def go() -> tuple[dict, dict[str, list[float]]]:
            timings: dict[str, list[float]] = {}
            async with httpx.AsyncClient(base_url=self.base, timeout=600) as client:
                latency, body = await self._post(client, req, timings)
            scores = [0.0] * len(req.documents)
            for r in body["results"]:
                scores[r["index"]] = r["relevance_score"]
            return {"seconds": latency, "pairs": len(req.documents), "scores": scores}, timings

        return asyncio.run(go())

    def run_concurrent(self, requests: list[Request], clients: int) -> tuple[dict, dict[str, list[float]]]:
        async def go() -> tuple[dict, dict[str, list[float]]]:
            timings: dict[str, list[float]] = {}
            latencies: list[float] = []
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            async with httpx.AsyncClient(base_url=self.base, timeout=600, limits=limits) as client:

                async def one_client(k: int) -> None:
                    for req in requests[k::clients]:
                        latency, _ = await self._post(client, req, timings)
                        latencies.append(latency)

                start = time.perf_counter()
                await asyncio.gather(*(one_client(k) for k in range(clients)))
                seconds = time.perf_counter() - start
            return {"seconds": seconds, "pairs": sum(len(r.documents) for r in requests), "latencies": latencies}, timings

        return asyncio.run(go())

    def peak_rss(self) -> int:
        return peak_rss_bytes(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class Gateway(HttpSystem):
    label = "rerank-gateway over HTTP (backend flag)"

    def __init__(self, model_dir: Path, work_dir: Path, runtime: str = "auto") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        registry = work_dir / "registry.yaml"
        # A plain entry with NO profile: the budget is the one the gateway chooses for this machine.
        registry.write_text(
            json.dumps(  # JSON is YAML
                {
                    "default_model": MODEL_ID,
                    "server": {"max_documents": 10000, "request_timeout_s": 600},
                    "models": {MODEL_ID: {"backend": "flag", "source": str(model_dir), "max_length": 512, "load": "eager", "runtime": runtime}},
                },
                indent=2,
            )
        )
        # The gateway runs with the environment a user gives it: its tokenizer lanes keep the library's
        # own threading off (engine/lanes.py), and the other systems' "true" would turn it on.
        env = {k: v for k, v in child_env().items() if k != "TOKENIZERS_PARALLELISM"}
        self._start([sys.executable, "-m", "ops.cli", "serve", "--registry", str(registry), "--port", str(self.port)],
                    work_dir, "gateway", env)
        self.dtype = ""
        self.runtime = ""
        self.budget: dict[str, Any] = {}

    def on_ready(self) -> None:
        model = httpx.get(f"{self.base}/v1/models", timeout=5).json()["data"][0]
        self.dtype = model["dtype"]
        self.runtime = model.get("runtime") or f"torch ({self.dtype})"
        self.budget = {"max_batch_tokens": model["max_batch_tokens"], "budget_reason": model.get("budget_reason"), "runtime": self.runtime}

    def tokens(self) -> tuple[float, float]:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text

        def value(name: str) -> float:
            m = re.search(rf'^{name}_total{{model="{MODEL_ID}"}} (\S+)$', text, re.M)
            return float(m.group(1)) if m else 0.0

        return value("rerank_real_tokens"), value("rerank_padded_tokens")


# Infinity lives in a virtualenv of its own (it pins old numpy and transformers): `make bench` creates it.
INFINITY_VENV = ROOT / ".venv-infinity"
INFINITY_ARGS = ["--engine", "torch", "--device", "cpu", "--dtype", "bfloat16", "--batch-size", "32"]


class Infinity(HttpSystem):
    """michaelfeil/infinity (infinity-emb 0.0.78) as its docs run it on a CPU, on the same model directory."""

    label = "Infinity 0.0.78 over HTTP (" + " ".join(INFINITY_ARGS) + ")"
    path = "/rerank"
    ready_path = "/health"

    def __init__(self, model_dir: Path, work_dir: Path, venv: Path = INFINITY_VENV) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0",
                   DO_NOT_TRACK="1")
        env.pop("PYTHONPATH", None)
        self._start([str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(model_dir), "--served-model-name", MODEL_ID,
                     *INFINITY_ARGS, "--host", "127.0.0.1", "--port", str(self.port)], work_dir, "infinity", env)


HTTP_SYSTEMS = {"gateway": Gateway, "infinity": Infinity}


# -- the run ----------------------------------------------------------------------------------------------


def score_agreement(reference: list[float], other: list[float]) -> dict[str, float]:
    """Max absolute difference and Spearman rank correlation of two score lists."""

    def ranks(xs: list[float]) -> list[float]:
        order = sorted(range(len(xs)), key=xs.__getitem__)
        out = [0.0] * len(xs)
        for r, i in enumerate(order):
            out[i] = float(r)
        return out

    a, b = ranks(reference), ranks(other)
    n = len(a)
    d2 = sum((x - y) ** 2 for x, y in zip(a, b))
    return {
        "max_abs_diff": max(abs(x - y) for x, y in zip(reference, other)),
        "spearman": 1 - 6 * d2 / (n * (n * n - 1)) if n > 1 else 1.0,
    }


def run(sizes: Sizes, model_dir: Path, work_dir: Path, systems: list[str], gateway_runtime: str = "auto") -> dict[str, Any]:
    from bench.models import build_minilm_cross_encoder

    build_minilm_cross_encoder(model_dir)
    words = vocabulary(model_dir)
    big = big_request(words, sizes.docs)
    n_small = sizes.clients * sizes.requests_per_client
    small = small_requests(words, n_small, sizes.docs_per_request)
    n_small_lib = sizes.clients * sizes.library_requests_per_client  # they serve one call at a time

    # Start everything at once: loading overlaps, measuring does not.
    workers = {name: LibraryWorker(name, model_dir, work_dir) for name in systems if name in LIBRARIES}
    servers: dict[str, HttpSystem] = {}
    try:
        for name in systems:
            if name in HTTP_SYSTEMS:
                servers[name] = Gateway(model_dir, work_dir, gateway_runtime) if name == "gateway" else HTTP_SYSTEMS[name](model_dir, work_dir)
        for w in workers.values():
            w.wait_ready()
            w.call(op="warmup")
        for server in servers.values():
            server.wait_ready()
            server.run_concurrent(small[: sizes.clients], sizes.clients)  # warm the HTTP path

        results: dict[str, dict[str, Samples]] = {name: {"big": Samples(), "concurrent": Samples()} for name in systems}
        big_scores: dict[str, list[float]] = {}
        load_before = os.getloadavg()
        def measure(name: str, workload: str, rnd: int) -> None:
            print(f"round {rnd + 1}/{sizes.rounds}: {name} {workload}", file=sys.stderr, flush=True)
            samples = results[name][workload]
            pid = servers[name].proc.pid if name in servers else workers[name].proc.pid
            cpu_before = cpu_seconds(pid)
            if name in servers:
                server = servers[name]
                before = server.tokens()
                if workload == "big":
                    out, timings = server.run_big(big)
                    out["latencies"] = [out["seconds"]]
                else:
                    out, timings = server.run_concurrent(small, sizes.clients)
                after = server.tokens()
                real, padded = (after[0] - before[0], after[1] - before[1]) if before and after else (0, 0)
                out["real_tokens"], out["padded_tokens"] = int(real), int(padded)
                _merge(samples.extra, timings)
            elif workload == "big":
                out = workers[name].call(op="big", docs=sizes.docs)
                out["latencies"] = [out["seconds"]]
            else:
                out = workers[name].call(op="concurrent", requests=n_small_lib, docs_per_request=sizes.docs_per_request, clients=sizes.clients)
            samples.add(rnd, out["seconds"], out["pairs"], out["latencies"], out["real_tokens"], out["padded_tokens"])
            samples.cpu_seconds.append(cpu_seconds(pid) - cpu_before)
            if workload == "big":
                big_scores[name] = out["scores"]

        for rnd in range(sizes.rounds):
            # The pairs the targets compare run back to back (ceiling / gateway on the big request, the
            # gateway's two workloads), in mirrored order every other round.
            fast = [("ceiling", "big"), ("gateway", "big"), ("infinity", "big"),
                    ("infinity", "concurrent"), ("gateway", "concurrent"), ("ceiling", "concurrent")]
            slow = [(n, "big") for n in SLOW_LIBRARIES] if rnd < sizes.library_rounds else []
            if rnd == 0:
                slow += [(n, "concurrent") for n in SLOW_LIBRARIES]
            steps = fast + slow if rnd % 2 == 0 else slow[::-1] + fast[::-1]
            for name, workload in steps:
                if name in systems:
                    measure(name, workload, rnd)
        load_after = os.getloadavg()

        labels = {name: w.label for name, w in workers.items()}
        peaks = {name: w.peak_rss() for name, w in workers.items()}
        for name, server in servers.items():
            # The runtime names its precision, e.g. "openvino (bfloat16)".
            labels[name] = server.label + (f", runtime {server.runtime}" if isinstance(server, Gateway) else "")
            peaks[name] = server.peak_rss()
        gateway_budget = servers["gateway"].budget if "gateway" in servers else None
    finally:
        for w in workers.values():
            w.close()
        for server in servers.values():
            server.close()

    reference = "flag" if "flag" in big_scores else next(iter(big_scores))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.rerank_bench", *sys.argv[1:]]),
        "machine": machine(),
        "load_average_before_after": [load_before[0], load_after[0]],
        "sizes": sizes.__dict__,
        "workload": {
            "big_request": {"docs": len(big.documents), "words_mean": statistics.mean(len(d.split()) for d in big.documents)},
            "concurrent": {"clients": sizes.clients, "docs_per_request": sizes.docs_per_request,
                           "requests_gateway_per_round": n_small, "requests_library_per_round": n_small_lib},
        },
        # The registry entry has no profile: the budget the gateway chose, and why (its /v1/models).
        "gateway_budget": gateway_budget,
        "systems": {
            name: {
                "label": labels[name],
                "peak_rss_mb": peaks[name] / 2**20,
                "big": results[name]["big"].summary(),
                "concurrent": results[name]["concurrent"].summary(),
            }
            for name in systems
        },
        "score_agreement_vs": reference,
        "score_agreement": {name: score_agreement(big_scores[reference], s) for name, s in big_scores.items() if name != reference},
    }


def _merge(into: dict[str, list[float]], more: dict[str, list[float]]) -> None:
    for k, v in more.items():
        into.setdefault(k, []).extend(v)


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    from core.host import cpu_flags, cpu_model_name

    cpu = cpu_model_name()

    versions = {}
    for pkg in ("torch", "transformers", "FlagEmbedding", "sentence-transformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bf16": [f for f in ("amx_bf16", "avx512_bf16") if f in cpu_flags()],
        "python": platform.python_version(),
        **versions,
    }


# -- the report -------------------------------------------------------------------------------------------


def targets(res: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(what, measured, target, met) for the issue's targets that this run can check."""
    s = res["systems"]
    if "gateway" not in s:
        return []
    big, conc_name = workload_names(res["sizes"])
    gw_big = s["gateway"]["big"]["pairs_per_s_rounds"]
    out = []
    for name, want, what in (("crossencoder", 2.5, "gateway / CrossEncoder.predict"),
                             ("flag", 5.0, "gateway / FlagReranker.compute_score"),
                             ("ceiling", 0.9, "gateway / ceiling")):
        if name in s:
            ratio = paired_ratio(gw_big, s[name]["big"]["pairs_per_s_rounds"])
            out.append((f"{what}, {big}", ratio, want, ratio >= want))
    if "infinity" in s:
        inf = s["infinity"]
        for wl, wl_name in (("big", big), ("concurrent", conc_name)):
            ratio = paired_ratio(s["gateway"][wl]["pairs_per_s_rounds"], inf[wl]["pairs_per_s_rounds"])
            out.append((f"gateway / Infinity bf16, {wl_name}", ratio, 1.5, ratio >= 1.5))
            per_cpu = paired_ratio(s["gateway"][wl]["pairs_per_cpu_s_rounds"], inf[wl]["pairs_per_cpu_s_rounds"])
            out.append((f"gateway / Infinity bf16 per CPU-second, {wl_name}", per_cpu, 1.5, per_cpu >= 1.5))
        p99 = s["gateway"]["concurrent"]["p99_ms"] / inf["concurrent"]["p99_ms"]
        out.append((f"gateway p99 / Infinity p99, {conc_name}", p99, 1.0, p99 < 1.0))
    conc = s["gateway"]["concurrent"]
    ratio = paired_ratio(conc["pairs_per_s_rounds"], gw_big)
    out.append((f"gateway throughput, {conc_name} / {big}", ratio, 0.9, ratio >= 0.9))
    tail = conc["p99_ms"] / conc["p50_ms"]
    out.append((f"gateway p99 / p50 latency, {conc_name}", tail, 3.0, tail < 3.0))
    for wl, wl_name in (("big", big), ("concurrent", conc_name)):
        eff = s["gateway"][wl]["padding_efficiency"]
        out.append((f"gateway padding efficiency, {wl_name}", eff, 0.9, eff >= 0.9))
    return out


def paired_ratio(a: dict[int, float], b: dict[int, float]) -> float:
    """Median over rounds of a / b, each ratio taken within one round: load drift between rounds cancels."""
    return statistics.median(a[r] / b[r] for r in a if r in b)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def workload_names(sz: dict[str, Any]) -> tuple[str, str]:
    return f"1 x {sz['docs']} docs", f"{sz['clients']} clients x {sz['docs_per_request']} docs"


def markdown(res: dict[str, Any]) -> str:
    sz = res["sizes"]
    big_name, conc_name = workload_names(sz)
    lines = [
        "| system | workload | pairs/s | pairs/CPU-s | p50 ms | p99 ms | padding eff. | peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, sysres in res["systems"].items():
        for wl, wl_name in (("big", big_name), ("concurrent", conc_name)):
            r = sysres[wl]
            eff = "-" if r["padding_efficiency"] is None else f"{r['padding_efficiency'] * 100:.1f}%"
            lines.append(
                f"| {sysres['label']} | {wl_name} | {r['pairs_per_s']:.1f} | {_num(r.get('pairs_per_cpu_s'))} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {eff} | {sysres['peak_rss_mb']:.0f} |"
            )
    lines.append("")
    checks = targets(res)
    if checks:
        lines += ["| target | measured | wanted | met |", "| --- | ---: | ---: | --- |"]
        for what, value, want, met in checks:
            lines.append(f"| {what} | {value:.2f} | {'<' if 'p99' in what else '>='} {want:g} | {'yes' if met else 'NO'} |")
        lines.append("")
    if res["score_agreement"]:
        ref = res["systems"][res["score_agreement_vs"]]["label"]
        lines.append(f"Relevance scores on the {big_name} request against {ref}:")
        for name, agr in res["score_agreement"].items():
            lines.append(f"- {name}: max |diff| {agr['max_abs_diff']:.4f}, Spearman {agr['spearman']:.4f}")
        lines.append("")
    m = res["machine"]
    lines.append(
        f"{res['date']} · {m['cpu']}, {m['cores']} cores, bf16: {', '.join(m['bf16']) or 'none'} · torch {m.get('torch')} · "
        f"load average {res['load_average_before_after'][0]:.1f} -> {res['load_average_before_after'][1]:.1f} · "
        f"{sz['rounds']} interleaved rounds ({sz['library_rounds']} for FlagReranker and CrossEncoder); pairs/s are "
        f"medians over rounds, target ratios medians of within-round ratios; the {big_name} p50/p99 are over rounds; "
        f"in-process libraries serve one call at a time, so their {conc_name} latencies include waiting for the "
        f"calls ahead."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on a tiny workload, one round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    parser.add_argument("--docs", type=int, help="documents in the big request (default 1000)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of %(default)s")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "rerank-bench-minilm-ce"),
                        help="where the benchmark model is built (reused when present; default %(default)s)")
    parser.add_argument("--gateway-runtime", default="auto", choices=["auto", "torch", "openvino", "onnxruntime"],
                        help="the gateway's `runtime:` (default auto, as a user's plain entry has it; the test smoke run uses torch)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and markdown (default %(default)s)")
    args = parser.parse_args(argv)

    sizes = Sizes(**QUICK.__dict__) if args.quick else Sizes()
    if args.rounds:
        sizes.rounds = args.rounds
    if args.docs:
        sizes.docs = args.docs
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    if "infinity" in systems and not (INFINITY_VENV / "bin" / "infinity_emb").exists():
        print(f"skipping infinity: {INFINITY_VENV} is missing (`make bench` creates it)", file=sys.stderr)
        systems.remove("infinity")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"  # the gateway's and each worker's output, kept for a look after a failure
    logs.mkdir(exist_ok=True)
    started = time.perf_counter()
    res = run(sizes, Path(args.model_dir), logs, systems, args.gateway_runtime)
    res["bench_seconds"] = time.perf_counter() - started
    stem = "rerank_bench_quick" if args.quick else "rerank_bench"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    report = markdown(res)
    (out / f"{stem}.md").write_text(report)
    print(report)
    print(f"wrote {out / stem}.json and .md in {res['bench_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
