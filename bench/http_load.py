"""Driving a `rerank-gateway serve` process over real HTTP: start it on a registry, one big request,
closed-loop clients, small requests beside a big one. Shared by the host-path benchmark (bench.host_path)
and the GPU check (bench.gpu_check), so both measure the same way.

Latencies are client-side wall times (request sent -> body read). Percentiles are nearest-rank.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from bench.workload import Request

ROOT = Path(__file__).resolve().parent.parent


def serve_module(root: Path) -> str:
    """The module whose `serve` runs the gateway in checkout `root` (gateway.cli before the house split)."""
    return "ops.cli" if (root / "ops" / "cli.py").exists() else "gateway.cli"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_cpu_ticks(pid: int | str = "self") -> dict[int, tuple[int, int]]:
    """Each thread of a process (Linux /proc): its nice value and the CPU time it has used so far (user +
    system, in clock ticks). A thread that ends meanwhile is left out."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # gone before its stat was opened, or while it was read
            continue
        out[int(task.name)] = (int(fields[16]), int(fields[11]) + int(fields[12]))
    return out


class GatewayProcess:
    """`python -m ops.cli serve` on a registry (a dict, written as JSON, which is YAML). `module`: another
    entry point taking the same arguments (bench.gpu_check.serve: the same CLI under a GPU memory cap)."""

    def __init__(
        self, registry: dict[str, Any], work_dir: Path, name: str = "gateway", env: dict[str, str] | None = None,
        module: str = "ops.cli", root: Path = ROOT,
    ) -> None:
        """`root`: the checkout to run (another commit's, for a side-by-side benchmark)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        work_dir.mkdir(parents=True, exist_ok=True)
        path = work_dir / f"{name}-registry.yaml"
        path.write_text(json.dumps(registry, indent=2))
        child = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        child["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [child.get("PYTHONPATH")])])
        child.update(env or {})
        self.log_path = work_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "serve", "--registry", str(path), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=child, cwd=root,
        )

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Until /ready answers 200. A model that failed to load leaves the gateway up and unready for good
        (/ready's `models` says `unavailable`): that ends the wait at once, with the log's reason, rather
        than at the timeout (a GPU check's section would spend its whole time limit waiting)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                r = httpx.get(f"{self.base}/ready", timeout=2)
                if r.status_code == 200:
                    return
                failed = [m for m, state in (r.json().get("models") or {}).items() if state == "unavailable"]
                if failed:
                    raise RuntimeError(f"gateway model(s) {', '.join(failed)} failed to load: {self.log_path.read_text()[-3000:]}")
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"gateway not ready after {timeout_s:g} s: {self.log_path.read_text()[-3000:]}")

    def models(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.base}/v1/models", timeout=30).json()["data"]

    def metrics_text(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=30).text

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) the server process has used so far (Linux /proc): in all, and by the
        engine's thread priorities, which say what a thread does on a CPU: the inference streams run at nice
        10, the bulk tokenizer lane at 19, the event loop and the small requests' lane at 0."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {"all": 0.0, "event loop, small tokenizing": 0.0, "inference streams": 0.0, "bulk tokenizing": 0.0}
        names = {0: "event loop, small tokenizing", 10: "inference streams", 19: "bulk tokenizing"}
        for nice, ticks in thread_cpu_ticks(self.proc.pid).values():
            seconds = ticks / tick
            out["all"] += seconds
            name = names.get(nice)
            if name is not None:
                out[name] += seconds
        return out

    def batch_counters(self, model: str) -> dict[str, float]:
        """The model's batch counters from /metrics: batches, pairs, real and padded tokens, forward seconds,
        and the inference threads' wall and CPU seconds in each step of its batches."""
        names = {
            "batches": "rerank_batch_pairs_count", "pairs": "rerank_batch_pairs_sum", "real_tokens": "rerank_real_tokens_total",
            "padded_tokens": "rerank_padded_tokens_total", "forward_s": "rerank_inference_seconds_sum",
        }
        text = self.metrics_text()
        values = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            values[name] = value
        counters = {key: float(values.get(f'{metric}{{model="{model}"}}', 0.0)) for key, metric in names.items()}
        return counters | {f"{clock}:{step}": seconds for (clock, step), seconds in step_seconds(text, model).items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


async def _post(client: httpx.AsyncClient, model: str, req: Request) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    resp = await client.post("/v1/rerank", json={"model": model, "query": req.query, "documents": req.documents, "return_documents": False})
    latency = time.perf_counter() - start
    if resp.status_code != 200:
        raise RuntimeError(f"gateway answered {resp.status_code}: {resp.text[:300]}")
    return latency, {"body": resp.json(), "headers": dict(resp.headers)}


def big(base: str, model: str, req: Request) -> dict[str, Any]:
    """One request; its pairs/s and the server's timing headers."""

    async def go() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=base, timeout=900) as client:
            latency, out = await _post(client, model, req)
        h = out["headers"]
        scores = [0.0] * len(req.documents)
        for r in out["body"]["results"]:
            scores[r["index"]] = r["relevance_score"]
        return {
            "seconds": latency, "pairs": len(req.documents), "pairs_per_s": len(req.documents) / latency,
            "tokenize_ms": float(h.get("x-tokenize-time", "nan")), "queue_ms": float(h.get("x-queue-time", "nan")),
            "inference_ms": float(h.get("x-inference-time", "nan")), "scores": scores,
        }

    return asyncio.run(go())


def step_seconds(metrics_text: str, model: str) -> dict[tuple[str, str], float]:
    """The inference threads' seconds in each step of the model's batches (engine.step_time), from /metrics'
    text, by (clock, step): ("wall", "collate"), ("cpu", "collate"), ..."""
    out = {}
    for line in metrics_text.splitlines():
        name, _, value = line.rpartition(" ")
        for metric, clock in (("rerank_batch_step_seconds_total", "wall"), ("rerank_batch_step_cpu_seconds_total", "cpu")):
            prefix = f'{metric}{{model="{model}",step="'
            if name.startswith(prefix):
                out[clock, name[len(prefix):-2]] = float(value)
    return out


class _KeepAlive:
    """One keep-alive HTTP/1.1 connection that posts pre-encoded JSON bodies and reads whole answers: the
    closed loops' client. On the server's own cores httpx cost 1.5-1.8 ms of CPU a request (bench.host_path's
    16 x 20 documents, ~8% of a 2-core machine, a tenth of what the server spends on such a request); this
    costs a fraction of that, so the loop measures the server rather than its client."""

    def __init__(self, base: str) -> None:
        hostport = base.split("://", 1)[1].rstrip("/")
        self.host, _, port = hostport.rpartition(":")
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), self.host.encode(), self.port, len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def costed(gw: GatewayProcess, model: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s result with what the server spent on it: CPU time per pair (every thread of the process)
    and its batches (pairs per batch, padding, forward seconds, the inference thread's wall and CPU
    milliseconds a batch in each step), from /metrics before and after; and, when
    the result has its wall time (`seconds`), the device's busy share: the batches' forward time over it
    (on a GPU, CUDA events' device time, one stream a model, so batches do not overlap)."""
    before, cpu = gw.batch_counters(model), gw.cpu_seconds()
    out = run()
    now, after = gw.cpu_seconds(), gw.batch_counters(model)
    spent = {k: now[k] - cpu[k] for k in now}
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    batches = max(1.0, d["batches"])
    requests = max(1, out.get("requests", 1))
    out["server"] = {
        "cpu_ms_per_pair": spent["all"] * 1000 / max(1.0, d["pairs"]), "cpu_ms_per_request": spent["all"] * 1000 / requests,
        "cpu_ms_per_request_by_threads": {k: v * 1000 / requests for k, v in spent.items() if k != "all"},
        "batches": d["batches"], "padded_tokens": d["padded_tokens"], "pairs_per_batch": d["pairs"] / max(1.0, d["batches"]),
        "padding": d["real_tokens"] / max(1.0, d["padded_tokens"]), "forward_ms_per_batch": d["forward_s"] * 1000 / batches,
        # A batch's steps on its inference thread: [wall ms, CPU ms] each (waits are wall, not CPU).
        "step_ms_per_batch": {
            k[len("wall:"):]: [v * 1000 / batches, d.get("cpu:" + k[len("wall:"):], 0.0) * 1000 / batches]
            for k, v in d.items() if k.startswith("wall:")
        },
    }
    if out.get("seconds"):
        out["server"]["device_busy"] = d["forward_s"] / out["seconds"]
    return out


def closed_loop(base: str, model: str, requests: list[Request], clients: int) -> dict[str, Any]:
    """`clients` closed-loop clients (a keep-alive connection each) sending `requests` round-robin; pairs/s
    and latency percentiles. The bodies are encoded before the clock starts."""
    bodies = [
        json.dumps({"model": model, "query": r.query, "documents": r.documents, "return_documents": False}).encode()
        for r in requests
    ]

    async def go() -> dict[str, Any]:
        latencies: list[float] = []

        async def one(k: int) -> None:
            conn = _KeepAlive(base)
            try:
                for body in bodies[k::clients]:
                    start = time.perf_counter()
                    status, payload = await conn.post("/v1/rerank", body)
                    latencies.append(time.perf_counter() - start)
                    if status != 200:
                        raise RuntimeError(f"gateway answered {status}: {payload[:300]!r}")
            finally:
                await conn.close()

        start = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(clients)))
        seconds = time.perf_counter() - start
        return latency_summary(latencies, seconds, sum(len(r.documents) for r in requests))

    return asyncio.run(go())


def beside_big(base: str, model: str, big_req: Request, small: list[Request], *, gap_s: float = 0.0) -> dict[str, Any]:
    """Small requests, one at a time, while one big request runs; latencies of those sent while it ran."""

    async def go() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=base, timeout=900) as client:
            big_task = asyncio.ensure_future(_post(client, model, big_req))
            await asyncio.sleep(0.05)
            latencies: list[float] = []
            k = 0
            while not big_task.done():
                latency, _ = await _post(client, model, small[k % len(small)])
                if not big_task.done():
                    latencies.append(latency)
                k += 1
                if gap_s:
                    await asyncio.sleep(gap_s)
            big_latency, _ = await big_task
        out = latency_summary(latencies, sum(latencies), 0)
        out["big_seconds"] = big_latency
        return out

    return asyncio.run(go())


def sequential(base: str, model: str, small: list[Request]) -> dict[str, Any]:
    """Small requests one at a time on an idle server: the 'alone' reference."""

    async def go() -> dict[str, Any]:
        latencies = []
        async with httpx.AsyncClient(base_url=base, timeout=900) as client:
            for req in small:
                latency, _ = await _post(client, model, req)
                latencies.append(latency)
        return latency_summary(latencies, sum(latencies), sum(len(r.documents) for r in small))

    return asyncio.run(go())


def latency_summary(latencies: list[float], seconds: float, pairs: int) -> dict[str, Any]:
    return {
        "requests": len(latencies), "seconds": seconds, "pairs": pairs,
        "pairs_per_s": pairs / seconds if seconds else float("nan"),
        "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99), "max_s": max(latencies, default=float("nan")),
    }
