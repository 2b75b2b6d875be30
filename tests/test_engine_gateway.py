"""The engine's promises seen through real HTTP: a dead inference stream makes the model unavailable
(/ready 503) until the supervisor restarts it; a NaN score is a 5xx naming the model, never a null; cost is
checked before tokenizing; quota reservations count chunks; chunks per request are capped."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest
import torch

from bench import http_load
from core.config import parse_registry
from engine.inference import STEPS, WAIT_LAUNCH
from tenancy.auth import key_sha256
from tests.conftest import MINILM, LiveServer, app_client, minilm_registry
from tests.routes_fixtures import metric as metric_sample
from tests.tenant_fixtures import KEYS

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def docs(n: int, words: int = 6) -> list[str]:
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(words)) + f" {i}" for i in range(n)]


def rerank(url: str, documents: list, timeout: float = 60, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/rerank", json={"query": "alpha gamma", "documents": documents, **extra}, timeout=timeout)


def metric(url: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{url}/metrics").text.splitlines()
        if line.startswith(name + "{") and 'model="minilm"' in line
    )


@pytest.fixture(scope="module")
def srv():
    reg = minilm_registry(server={"max_queue_pairs": 30, "max_chunks_per_request": 50}, max_batch_size=8, cpu_streams=1, dtype="float32")
    with LiveServer(reg) as live:
        yield live


@pytest.fixture(autouse=True)
def no_hooks(srv):
    yield
    srv.scheduler("minilm").step_hook = None


def test_ready_is_503_while_a_dead_stream_restarts(srv):
    scheduler = srv.scheduler("minilm")
    fired = []

    def die_once(step, info):
        if step == "take" and not fired:
            fired.append(step)
            raise RuntimeError("injected: the stream dies")

    scheduler.step_hook = die_once
    resp = rerank(srv.url, docs(3))
    assert resp.status_code == 503 and "died" in resp.json()["message"], resp.text
    ready = httpx.get(f"{srv.url}/ready")
    assert ready.status_code == 503 and ready.json()["models"]["minilm"] == "unavailable", ready.text
    model = next(m for m in httpx.get(f"{srv.url}/v1/models").json()["data"] if m["id"] == "minilm")
    assert model["state"] == "unavailable" and "injected: the stream dies" in model["reason"], model
    refused = rerank(srv.url, docs(3))
    assert refused.status_code == 503 and "unavailable" in refused.json()["message"]
    deadline = time.monotonic() + 10
    while httpx.get(f"{srv.url}/ready").status_code != 200:
        assert time.monotonic() < deadline, "the supervisor never restarted the stream"
        time.sleep(0.05)
    assert rerank(srv.url, docs(3)).status_code == 200
    assert scheduler.restarts == 1


def step_seconds(url: str) -> dict[tuple[str, str], float]:
    """/metrics' seconds of the model's batches by (clock, step): ("wall", "collate"), ("cpu", "collate"), ..."""
    return http_load.step_seconds(httpx.get(f"{url}/metrics").text, "minilm")


def test_metrics_split_a_batchs_time_by_step_and_tell_waiting_from_work(srv):
    """/metrics splits each batch's time on its inference thread by step (engine.step_time), in wall and CPU
    seconds: a 1 s wait at the start of collation (a hook's sleep, as a held GIL or a preempted thread would
    make it) is collation's wall time, not its CPU time and not another step's."""
    assert rerank(srv.url, docs(3)).status_code == 200
    before = step_seconds(srv.url)
    assert {step for _, step in before} == {"build", WAIT_LAUNCH, *STEPS}
    srv.scheduler("minilm").step_hook = lambda step, info: time.sleep(1.0) if step == "collate" else None
    assert rerank(srv.url, docs(3)).status_code == 200  # one batch
    spent = {k: v - before.get(k, 0.0) for k, v in step_seconds(srv.url).items()}
    assert spent["wall", "collate"] >= 1.0 and spent["cpu", "collate"] < 0.5, spent
    for step in ("build", WAIT_LAUNCH, *STEPS):
        assert 0 <= spent["cpu", step] <= spent["wall", step] + 0.001, (step, spent)
        if step != "collate":
            assert spent["wall", step] < 0.5, (step, spent)
    assert spent["cpu", "forward"] > 0  # the forward is the thread's own work on a CPU


def test_a_batch_waiting_for_the_launch_lock_counts_it_as_its_own_step(srv):
    """On a GPU the two inference threads share the model's CUDA stream and take turns at its launch lock
    (engine.inference; on a CPU there is none). A batch that waits 1 s for its turn, the lock held here as
    the other thread's collation and launch would hold it, counts that second as `wait_launch`, not as its
    build or its collation."""
    scheduler = srv.scheduler("minilm")
    runner = scheduler.runner
    before = step_seconds(srv.url)
    taken = threading.Event()
    scheduler.step_hook = lambda step, info: taken.set() if step == "take" else None  # the batch is about to run
    original, lock = runner.launch, threading.Lock()
    runner.launch = lock
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with lock:
                answer = pool.submit(rerank, srv.url, docs(3))
                assert taken.wait(60)
                time.sleep(1.0)
            assert answer.result().status_code == 200
    finally:
        runner.launch = original
    spent = {k: v - before.get(k, 0.0) for k, v in step_seconds(srv.url).items()}
    assert spent["wall", WAIT_LAUNCH] >= 0.9 and spent["cpu", WAIT_LAUNCH] < 0.5, spent
    assert spent["wall", "build"] < 0.5 and spent["wall", "collate"] < 0.5, spent


def test_metrics_hold_every_batch_of_a_request_once_it_is_answered():
    """A request's batches run on both inference threads, and whichever scatters its last pairs answers it.
    Each batch is counted before its scores reach their requests, so /metrics read after the answer holds
    all of them, though the thread that scattered first is still busy with its batch (held here 1 s at the
    step after its scatter). A fresh-clone CI run read 423 of 981 tokens when batches were counted after."""
    after_scatter = STEPS[STEPS.index("scatter") + 1]
    held: list[str] = []

    def hold_the_first(step, info):
        if step == after_scatter and not held:
            held.append(threading.current_thread().name)
            time.sleep(1.0)

    with app_client(minilm_registry(cpu_streams=2, max_batch_tokens=128, dtype="float32")) as client:
        scheduler = client.app.state.pipeline.pool.entries["minilm"].scheduler
        assert scheduler.streams == 2
        scheduler.step_hook = hold_the_first
        resp = client.post("/v1/rerank", json={"model": "minilm", "query": "alpha gamma", "documents": docs(16)})
        assert resp.status_code == 200 and len(resp.json()["results"]) == 16
        assert held and metric_sample(client, "rerank_batch_pairs_count") >= 2
        assert metric_sample(client, "rerank_batch_pairs_sum") == 16


def test_a_non_finite_score_fails_its_request_naming_the_model(srv):
    backend = srv.scheduler("minilm").backend
    token = backend.tokenizer.convert_tokens_to_ids("zebra")
    weights = backend.model.embeddings.word_embeddings.weight
    saved = weights[token].clone()
    with torch.no_grad():
        weights[token] = float("inf")  # a real forward pass now yields NaN for any text with "zebra" in it
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            bad = pool.submit(rerank, srv.url, ["a zebra in the grass", *docs(3)])
            good = pool.submit(rerank, srv.url, docs(4))
            bad, good = bad.result(), good.result()
    finally:
        with torch.no_grad():
            weights[token] = saved
    assert bad.status_code >= 500 and "null" not in bad.text, bad.text
    message = bad.json()["message"]
    assert "'minilm'" in message and "NaN" in message, message
    assert good.status_code == 200 and all(r["relevance_score"] is not None for r in good.json()["results"])
    assert rerank(srv.url, ["a zebra in the grass"]).status_code == 200


def test_cost_is_checked_before_tokenizing(srv):
    scheduler = srv.scheduler("minilm")
    started = []

    def slow(step, info):
        if step == "forward":
            started.append(1)
            time.sleep(0.4)

    scheduler.step_hook = slow
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(rerank, srv.url, docs(28))
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        tokenized = metric(srv.url, "rerank_tokenize_seconds_count")
        refused = rerank(srv.url, docs(20))
        assert refused.status_code == 429 and "overloaded" in refused.json()["message"], refused.text
        assert metric(srv.url, "rerank_tokenize_seconds_count") == tokenized, "refused before it was tokenized"
        assert first.result().status_code == 200


def test_chunks_per_request_are_capped(srv):
    long_doc = " ".join(WORDS * 20)
    resp = rerank(srv.url, [long_doc], max_chunks_per_doc=10_000, max_tokens_per_doc=2)
    assert resp.status_code == 400, resp.text
    assert "max_chunks_per_request" in resp.json()["message"] and "50" in resp.json()["message"]
    assert rerank(srv.url, [long_doc], max_chunks_per_doc=10, max_tokens_per_doc=8).status_code == 200


def test_quota_reservation_counts_chunks(tmp_path):
    reg = parse_registry(
        {
            "default_model": "minilm",
            "models": {"minilm": {"backend": "embedding", "source": MINILM, "max_length": 64, "cpu_streams": 1}},
            "tenants": {"alpha": {"api_key_sha256": key_sha256(KEYS["alpha"]), "search_units_per_day": 30}},
            "usage": {"path": str(tmp_path / "usage.sqlite3")},
        }
    )
    auth = {"Authorization": f"Bearer {KEYS['alpha']}"}
    with app_client(reg) as client:
        # The case: one 400 KB document, 1 token per chunk, chunks unbounded: 2,000+ units.
        huge = {"query": "alpha", "documents": ["alpha beta " * 40_000], "max_tokens_per_doc": 1, "max_chunks_per_doc": 10**9}
        resp = client.post("/v1/rerank", json=huge, headers=auth)
        assert resp.status_code == 429 and "search units per day" in resp.json()["message"], resp.text
        # 400 chunks of a 2,000-character document cost 4 units: refused after 27 are used, never billed past 30.
        small = {"query": "alpha", "documents": docs(3)}
        for _ in range(27):
            assert client.post("/v1/rerank", json=small, headers=auth).status_code == 200
        chunked = {"query": "alpha", "documents": [" ".join(WORDS * 30)], "max_tokens_per_doc": 1, "max_chunks_per_doc": 400}
        resp = client.post("/v1/rerank", json=chunked, headers=auth)
        assert resp.status_code == 429, resp.text
        usage = client.get("/v1/usage", headers=auth).json()
        assert usage["total"]["search_units"] == 27, usage
        # With room, a chunked request is billed its real chunks.
        ok = client.post("/v1/rerank", json={**chunked, "max_chunks_per_doc": 150}, headers=auth)
        assert ok.status_code == 200, ok.text
        assert ok.json()["meta"]["billed_units"]["search_units"] == 2
        assert client.get("/v1/usage", headers=auth).json()["total"]["search_units"] == 29
