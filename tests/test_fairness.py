"""Fair scheduling across tenants, measured end to end on a real uvicorn server.

While tenant A keeps 10,000-document requests queued, tenant B's 20-document requests must complete with
a p99 latency within 3x of their p99 on the idle gateway.

The model is the tiny BERT with a CPU-sized batch budget (1,024 tokens): on a CPU a batch cannot be
interrupted, so any other tenant's request waits for the batch in flight; the bound only makes sense when
one batch costs about as much as B's own request. The machine running the tests is shared, so one
measurement can catch a neighbour's burst; the test measures again (idle and loaded both) before it
fails, and reports every attempt.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
import yaml

from tenancy.auth import key_sha256
from tests.conftest import serve_process
from tests.tenant_fixtures import KEYS, tiny_bert_dir

WORDS = "the quick brown fox jumps over the lazy dog while cats sleep on warm sofas in the afternoon sun and birds sing".split()
SAMPLES = 100
ATTEMPTS = 3


def _docs(n: int, seed: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + seed + j) % len(WORDS)] for j in range(10 + i % 30)) for i in range(n)]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fairness")
    model = tiny_bert_dir(tmp_path_factory.getbasetemp())
    registry = {
        "default_model": "tiny",
        "models": {"tiny": {"backend": "embedding", "source": str(model), "max_length": 128, "max_batch_tokens": 1024, "max_batch_size": 128,
                            # This tests the scheduler's fairness; with a tiny model the forward is mostly
                            # Python, and a second CPU stream adds GIL contention with the event loop.
                            # The runtime is the default (auto: OpenVINO here, when installed).
                            "cpu_streams": 1}},
        "tenants": {
            "alpha": {"api_key_sha256": key_sha256(KEYS["alpha"])},
            "beta": {"api_key_sha256": key_sha256(KEYS["beta"])},
        },
        "usage": {"path": str(base / "usage.sqlite3")},
    }
    (base / "registry.yaml").write_text(yaml.safe_dump(registry))
    with open(base / "server.log", "w") as log, serve_process(base / "registry.yaml", log=log, ready_timeout_s=120) as (url, _):
        yield url


async def _latencies(client: httpx.AsyncClient, body: dict, headers: dict, n: int) -> list[float]:
    """n requests one after another; each one's latency."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = await client.post("/v1/rerank", json=body, headers=headers)
        out.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.005)
    return out


async def _metric(client: httpx.AsyncClient, name: str) -> int:
    text = (await client.get("/metrics")).text
    match = re.search(rf'^{name}\{{model="tiny"\}} ([0-9.e+]+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


async def _measure(url: str) -> dict:
    small = {"query": "where do cats sleep", "documents": _docs(20, 1)}
    big = json.dumps({"query": "where do cats sleep", "documents": _docs(10_000, 2), "top_n": 100}).encode()
    beta = {"Authorization": f"Bearer {KEYS['beta']}"}
    alpha = {"Authorization": f"Bearer {KEYS['alpha']}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def beta_latencies(n: int) -> list[float]:
            return await _latencies(client, small, beta, n)

        await beta_latencies(5)  # warm
        idle = await beta_latencies(SAMPLES)

        async def alpha_keeps_queueing() -> None:
            while True:
                r = await client.post("/v1/rerank", content=big, headers=alpha)
                assert r.status_code == 200, r.text

        tokenized_before = await _metric(client, "rerank_tokenize_seconds_count")
        alpha_tasks = [asyncio.create_task(alpha_keeps_queueing()) for _ in range(4)]
        try:
            # Measure in the steady state, once A's first four requests are tokenized and queued: the
            # burst of 40,000 documents arriving at once is not what "keeps requests queued" means. A's
            # loops go on resubmitting, so its tokenization still runs during the measurement.
            deadline = time.monotonic() + 120
            while await _metric(client, "rerank_tokenize_seconds_count") < tokenized_before + 4:
                assert time.monotonic() < deadline, "tenant A's requests were never tokenized"
                await asyncio.sleep(0.1)
            loaded: list[float] = []
            queue_samples: list[int] = []
            for _ in range(SAMPLES // 10):
                loaded += await beta_latencies(10)
                queue_samples.append(await _metric(client, "rerank_queue_pairs"))
        finally:
            for task in alpha_tasks:
                task.cancel()  # the server cancels their queued pairs when the connections drop
            await asyncio.gather(*alpha_tasks, return_exceptions=True)
    return {"idle_p99": _p99(idle), "loaded_p99": _p99(loaded), "loaded_p50": sorted(loaded)[len(loaded) // 2], "min_queue": min(queue_samples)}


def test_small_tenant_keeps_its_latency_while_another_floods_the_queue(server):
    attempts = []
    for _ in range(ATTEMPTS):
        result = asyncio.run(_measure(server))
        # Tenant A really was queued the whole time B was measured.
        assert result["min_queue"] > 1_000, result
        attempts.append(result)
        if result["loaded_p99"] <= 3 * result["idle_p99"]:
            break
        time.sleep(1.0)  # let the cancelled work drain before measuring again
    report = "; ".join(
        f"idle p99 {a['idle_p99'] * 1e3:.0f} ms, loaded p50 {a['loaded_p50'] * 1e3:.0f} ms p99 {a['loaded_p99'] * 1e3:.0f} ms "
        f"({a['loaded_p99'] / a['idle_p99']:.2f}x), A queued >= {a['min_queue']} pairs"
        for a in attempts
    )
    print(report)
    assert attempts[-1]["loaded_p99"] <= 3 * attempts[-1]["idle_p99"], report


async def _measure_in_tenant(url: str) -> dict:
    """20 three-document searches alone, then next to 2,000-document requests, all of tenant alpha."""
    small = {"query": "where do cats sleep", "documents": _docs(3, 1)}
    big = json.dumps({"query": "where do cats sleep", "documents": _docs(2_000, 2), "top_n": 10}).encode()
    alpha = {"Authorization": f"Bearer {KEYS['alpha']}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def searches(n: int) -> list[float]:
            return await _latencies(client, small, alpha, n)

        await searches(5)
        alone = await searches(20)
        big_done = 0

        async def bulk() -> None:
            nonlocal big_done
            while True:
                r = await client.post("/v1/rerank", content=big, headers=alpha)
                assert r.status_code == 200, r.text
                big_done += 1

        tokenized_before = await _metric(client, "rerank_tokenize_seconds_count")
        tasks = [asyncio.create_task(bulk()) for _ in range(2)]
        try:
            deadline = time.monotonic() + 60
            while await _metric(client, "rerank_tokenize_seconds_count") < tokenized_before + 2:
                assert time.monotonic() < deadline, "the bulk requests were never tokenized"
                await asyncio.sleep(0.05)
            beside: list[float] = []
            queued: list[int] = []
            for _ in range(20):
                queued.append(await _metric(client, "rerank_queue_pairs"))
                beside += await searches(1)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    # The bulk work really was queued while the searches ran (a resubmitted one may still be tokenizing).
    busy = sum(q > 200 for q in queued) / len(queued)
    return {"alone_p99": _p99(alone), "beside_p99": _p99(beside), "busy": busy, "big_done": big_done}


# Issue 9's bound. Without fair sharing inside a tenant the searches waited for the whole bulk request:
# 2,468 ms against 13 ms alone (190x). With fair shares only, 2.3x-6.1x from run to run on this 2-core
# machine; with the query embedded in the stream, bulk batches shrunk while searches arrive and inference
# threads niced, 1.4x-2.8x.
IN_TENANT_BOUND = 3


def test_small_searches_do_not_wait_behind_a_bulk_request_of_their_own_tenant(server):
    attempts = []
    for _ in range(ATTEMPTS):
        result = asyncio.run(_measure_in_tenant(server))
        assert result["busy"] >= 0.75, result
        attempts.append(result)
        if result["beside_p99"] <= IN_TENANT_BOUND * result["alone_p99"]:
            break
        time.sleep(1.0)
    report = "; ".join(
        f"alone p99 {a['alone_p99'] * 1e3:.0f} ms, beside a 2,000-document request p99 {a['beside_p99'] * 1e3:.0f} ms "
        f"({a['beside_p99'] / a['alone_p99']:.2f}x)"
        for a in attempts
    )
    print(report)
    assert attempts[-1]["beside_p99"] <= IN_TENANT_BOUND * attempts[-1]["alone_p99"], report
