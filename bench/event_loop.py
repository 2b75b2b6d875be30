"""What one rerank request costs the event loop: the app driven in-process (no HTTP server, no client).

Every request's HTTP edge, dialect, pipeline, ledger and scheduler bookkeeping run on the one event-loop
thread, which all requests share and which holds the GIL meanwhile: on a GPU host, at hundreds of small
requests a second, it is what the tokenizer and inference threads wait for. This sends 20-document requests
one at a time to the real app (the tiny cross-encoder of bench.host_path, the usage ledger on as by
default, the access log written as `serve` writes it) and reports:

- CPU time of the event loop's thread per request (time.thread_time; noisy on a shared VM: compare
  checkouts in alternating runs);
- counts per request that do not depend on the machine, from cProfile: Python calls on the loop's
  thread, loop callbacks run, tasks and futures created.

    .venv/bin/python -m bench.event_loop [--requests 300] [--rounds 4] [--docs 20]
    PYTHONPATH=/tmp/old .venv/bin/python bench/event_loop.py    # another commit's app (git worktree add /tmp/old REV)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class InProcess:
    """The app with its lifespan started, called with one request at a time as an ASGI server would."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lifespan: asyncio.Queue = asyncio.Queue()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> InProcess:
        async def receive() -> dict:
            return await self._lifespan.get()

        async def send(message: dict) -> None:
            if message["type"].startswith("lifespan.startup"):
                if message["type"].endswith("failed"):
                    raise RuntimeError(message.get("message"))
                self._started.set()
            if message["type"].startswith("lifespan.shutdown"):
                self._stopped.set()

        await self._lifespan.put({"type": "lifespan.startup"})
        self._task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
        await self._started.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._lifespan.put({"type": "lifespan.shutdown"})
        await self._stopped.wait()

    async def post(self, path: str, body: bytes) -> int:
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays: no disconnect
            return {}

        status = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        headers = [(b"host", b"bench"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080), "state": {},
        }
        await self.app(scope, receive, send)
        return status[0]


def counts(stats: pstats.Stats, requests: int) -> dict[str, float]:
    def calls(name: str, module: str) -> int:
        return sum(v[1] for (path, _, fn), v in stats.stats.items() if fn == name and path.endswith(module))  # type: ignore[attr-defined]

    return {
        "python_calls": sum(v[1] for v in stats.stats.values()) / requests,  # type: ignore[attr-defined]
        "loop_callbacks": calls("_run", "asyncio/events.py") / requests,
        "tasks": calls("create_task", "asyncio/base_events.py") / requests,
        "futures": calls("create_future", "asyncio/base_events.py") / requests,
    }


async def measure(args: argparse.Namespace, work: Path, model_dir: Path | None = None) -> dict[str, Any]:
    """`model_dir`: a cross-encoder to serve (default: the tests' tiny one, built here)."""
    from bench.host_path import registry
    from bench.workload import small_requests, vocabulary
    from core.config import load_registry
    from gateway.app import create_app
    from observability import logs

    if model_dir is None:
        from tests.tiny_models import build_minilm_tiny_cross_encoder

        model_dir = build_minilm_tiny_cross_encoder(work / "tiny-ce")
    reg = registry(model_dir, "float32", "torch")
    reg["usage"] = {"path": str(work / "usage.sqlite3")}
    path = work / "registry.yaml"
    path.write_text(json.dumps(reg))
    app = create_app(load_registry(str(path)), wait_for_models=True)
    log_file = open(work / "serve.log", "w")
    logs.configure("text")
    logging.getLogger().handlers[0].setStream(log_file)  # as `serve` writes its log: one line a request
    requests = small_requests(vocabulary(model_dir), args.requests + 50, args.docs)
    bodies = [json.dumps({"model": "plain", "query": r.query, "documents": r.documents, "return_documents": False}).encode() for r in requests]
    out: dict[str, Any] = {"docs": args.docs, "requests": args.requests}
    async with InProcess(app) as client:
        for body in bodies[:50]:  # warm: the first batches, the ledger's first commits
            assert await client.post("/v1/rerank", body) == 200
        cpu = []
        for _ in range(args.rounds):
            start = time.thread_time()
            for body in bodies[50:]:
                assert await client.post("/v1/rerank", body) == 200
            cpu.append((time.thread_time() - start) * 1000 / args.requests)
        out["cpu_ms_per_request"] = cpu
        profile = cProfile.Profile()
        profile.enable()
        for body in bodies[50:]:
            await client.post("/v1/rerank", body)
        profile.disable()
        out |= counts(pstats.Stats(profile), args.requests)
    log_file.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from core.host import cpu_model_name

    with tempfile.TemporaryDirectory() as tmp:
        res = asyncio.run(measure(args, Path(tmp)))
    res["machine"] = cpu_model_name()
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    cpu = res["cpu_ms_per_request"]
    print(
        f"{res['docs']}-document requests, one at a time, in-process ({res['machine']}): event-loop CPU "
        f"{statistics.median(cpu):.2f} ms a request (rounds: {', '.join(f'{c:.2f}' for c in cpu)}); per request "
        f"{res['python_calls']:.0f} Python calls, {res['loop_callbacks']:.1f} loop callbacks, {res['tasks']:.1f} tasks, "
        f"{res['futures']:.1f} futures"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
