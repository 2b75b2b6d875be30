"""The cost of one remote hop: clients -> rerank-gateway (backend: remote, dialect: gateway) ->
rerank-gateway (the model) on loopback, against the same clients calling the model's gateway directly.

Workload: the benchmark's 16 closed-loop clients x 20-document requests (bench.workload), on the
benchmark's MiniLM-L6 cross-encoder (bench.models) served by backend `flag` with the benchmark's CPU
profile. Rounds alternate direct / via / via / direct ... so drift on a shared machine falls on both.
Both gateways share this machine's cores: the front door's CPU is taken from the model, which a front
door on its own machine would not do, so the figure is an upper bound for the hop. Reported besides
the paired round ratios (noisy on a shared machine): each process's CPU per request, the front door's own
time per request (latency minus its wait on the upstream), and a sequential probe (one client, direct and
via interleaved) whose p50 difference is the hop's latency with no queueing in the model.

    flock /tmp/rerank-heavy.lock .venv/bin/python -m bench.remote_hop [--rounds 4] [--requests-per-client 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.models import CPU_BATCH_TOKENS, build_minilm_cross_encoder
from bench.workload import Request, small_requests, vocabulary

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "bench-ce"


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(registry: dict, work: Path, name: str) -> tuple[str, subprocess.Popen]:
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(registry))  # JSON is YAML
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    log = open(work / f"{name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--registry", str(path), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited (see {log.name})")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} not ready (see {log.name})")


async def _round(url: str, requests: list[Request], clients: int, own: list[float] | None = None) -> tuple[float, list[float]]:
    """One closed-loop round: (seconds, per-request latencies). With `own`, also collects each answer's
    time outside its model call (latency - x-inference-time): for the front door, its own share of the hop."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_client(k: int) -> None:
            for req in requests[k::clients]:
                start = time.perf_counter()
                r = await client.post("/v1/rerank", json={"model": MODEL_ID, "query": req.query, "documents": req.documents})
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
                if own is not None:
                    own.append(latencies[-1] - float(r.headers["x-inference-time"]) / 1000)

        start = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(clients)))
        return time.perf_counter() - start, latencies


def _sequential(direct: str, via: str, requests: list[Request], n: int) -> dict[str, list[float]]:
    """One client, one request at a time, direct and via interleaved (order flipped each time): the hop's
    latency with no queueing in the model, and drift on a shared machine falling on both alike."""
    lat: dict[str, list[float]] = {"direct": [], "via": []}
    with httpx.Client(timeout=600) as client:
        for i in range(n):
            req = requests[i % len(requests)]
            for name, url in ((("direct", direct), ("via", via)) if i % 2 else (("via", via), ("direct", direct))):
                start = time.perf_counter()
                r = client.post(f"{url}/v1/rerank", json={"model": MODEL_ID, "query": req.query, "documents": req.documents})
                if r.status_code != 200:
                    raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
                lat[name].append(time.perf_counter() - start)
    return lat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds per system (alternating)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--docs-per-request", type=int, default=20)
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--sequential", type=int, default=100, help="interleaved one-at-a-time requests per system")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="remote-hop-") as tmp:
        work = Path(tmp)
        model_dir = build_minilm_cross_encoder(work / "model")
        model = {"backend": "flag", "source": str(model_dir), "max_length": 512,
                 "profiles": {"cpu": {"max_batch_tokens": CPU_BATCH_TOKENS, "max_batch_size": 256}}}
        server = {"max_documents": 10000, "request_timeout_s": 600}
        direct, p1 = _serve({"default_model": MODEL_ID, "server": server, "models": {MODEL_ID: model}, "usage": {"path": None}}, work, "model")
        front_model = {"backend": "remote", "dialect": "gateway", "upstream_model": MODEL_ID, "endpoints": [direct], "timeout_s": 600}
        via, p2 = _serve({"default_model": MODEL_ID, "server": server, "models": {MODEL_ID: front_model}, "usage": {"path": None}}, work, "front")
        try:
            words = vocabulary(model_dir)
            requests = small_requests(words, args.clients * args.requests_per_client, args.docs_per_request)
            pairs = len(requests) * args.docs_per_request
            asyncio.run(_round(via, requests[: args.clients], args.clients))  # warm both paths
            results: dict[str, list[tuple[float, list[float]]]] = {"direct": [], "via": []}
            front_own: list[float] = []
            cpu = {"model_direct": 0.0, "model_via": 0.0, "front_via": 0.0}
            for rnd in range(args.rounds):
                order = ["direct", "via"] if rnd % 2 == 0 else ["via", "direct"]
                for name in order:
                    url, own = (direct, None) if name == "direct" else (via, front_own)
                    m0, f0 = _cpu_s(p1.pid), _cpu_s(p2.pid)
                    results[name].append(asyncio.run(_round(url, requests, args.clients, own)))
                    cpu[f"model_{name}"] += _cpu_s(p1.pid) - m0
                    if name == "via":
                        cpu["front_via"] += _cpu_s(p2.pid) - f0
                    seconds, lat = results[name][-1]
                    print(f"round {rnd} {name:6s} {pairs / seconds:7.1f} pairs/s  p50 {statistics.median(lat) * 1000:7.1f} ms", flush=True)
            seq = _sequential(direct, via, requests, args.sequential)
        finally:
            for proc in (p2, p1):
                proc.terminate()
                proc.wait(timeout=30)

    def summary(name: str) -> dict[str, float]:
        rates = [pairs / s for s, _ in results[name]]
        lat = sorted(x for _, ls in results[name] for x in ls)
        return {
            "pairs_per_s": statistics.median(rates),
            "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000,
        }

    d, v = summary("direct"), summary("via")
    # Paired per round: each via round against the direct round next to it.
    ratios = [pairs / sv / (pairs / sd) for (sd, _), (sv, _) in zip(results["direct"], results["via"])]
    p50_added = [statistics.median(lv) * 1000 - statistics.median(ld) * 1000 for (_, ld), (_, lv) in zip(results["direct"], results["via"])]
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "workload": f"{args.clients} clients x {args.docs_per_request} documents, {args.requests_per_client} requests each, {args.rounds} rounds",
        "direct": d,
        "via_remote_hop": v,
        "throughput_ratio_per_round": [round(r, 3) for r in ratios],
        "throughput_ratio_median": round(statistics.median(ratios), 3),
        "added_p50_ms_per_round": [round(x, 1) for x in p50_added],
        "added_p50_ms_median": round(statistics.median(p50_added), 1),
        # The front door's own time per request (client latency minus its wait on the upstream call):
        # independent of how busy the shared cores make the model.
        # CPU per request: what the hop costs in throughput when the front door shares the model's cores.
        "cpu_ms_per_request": {k: round(v / (len(requests) * args.rounds) * 1000, 2) for k, v in cpu.items()},
        "front_cpu_share_of_model_cpu": round(cpu["front_via"] / max(cpu["model_via"], 1e-9), 4),
        "sequential_p50_ms": {k: round(statistics.median(v) * 1000, 2) for k, v in seq.items()},
        "sequential_added_p50_ms": round((statistics.median(seq["via"]) - statistics.median(seq["direct"])) * 1000, 2),
        "front_door_own_ms": {"p50": round(statistics.median(front_own) * 1000, 2), "p99": round(sorted(front_own)[int(0.99 * len(front_own))] * 1000, 2)},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
