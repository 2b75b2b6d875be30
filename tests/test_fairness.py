"""Fair scheduling across tenants and across the requests of one tenant, end to end on a real server.

A small request must not be queued behind another request's backlog: while tenant A keeps 40,000 pairs
queued, tenant B's 20-document request is scored after the batch in flight, not after A's queue; inside
one tenant, a 3-document search is not scored after a 2,000-document request of its own tenant.

Each small request's wait is counted in the server's own work, not in wall time: the tokens the model
scored for the other requests while it was outstanding (the metrics' real-token counter, read before
and after it), over the tokens they had queued when it arrived (the queue gauge). First in, first out, a
small request waits for all of them: 1.0 or more (1.34 measured with the fair queue turned into FIFO).
With fair queueing it waits for the batch in flight and its own: ~0.01. A neighbour stalling the machine
slows the batches and the small requests alike and moves neither count, where the wall-time bound this
test used to have (loaded p99 within 3x of idle p99) failed whenever a neighbour's burst caught the
loaded phase, or when one of A's batches alone took 3x B's request (e.g. 41 ms against 12 ms on a loaded
2-core Xeon). Latencies are printed, not asserted (README: the measured figures).

The model is the tiny BERT with a CPU-sized batch budget (1,024 tokens) on one inference stream: a batch
cannot be interrupted, so a small request waits for the batch in flight; with a small budget that wait is
a few milliseconds and the queue holds hundreds of batches.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

import httpx
import pytest
import yaml

from tenancy.auth import key_sha256
from tests.conftest import serve_process
from tests.tenant_fixtures import KEYS, tiny_bert_dir

WORDS = "the quick brown fox jumps over the lazy dog while cats sleep on warm sofas in the afternoon sun and birds sing".split()
BUDGET = 1024  # the model's max_batch_tokens
SAMPLES = 50
# 9 of 10 small requests wait for less than this share of the others' queued tokens (FIFO: all of them,
# every time); the tenth may have been caught by a stall of the test's own process, while the server
# went on scoring. No request waits for the whole queue.
SHARE_P90 = 0.1


def _docs(n: int, seed: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + seed + j) % len(WORDS)] for j in range(10 + i % 30)) for i in range(n)]


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fairness")
    model = tiny_bert_dir(tmp_path_factory.getbasetemp())
    registry = {
        "default_model": "tiny",
        "models": {"tiny": {"backend": "embedding", "source": str(model), "max_length": 128, "max_batch_tokens": BUDGET, "max_batch_size": 128,
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


@dataclass
class Counters:
    scored: int  # real tokens the model has scored since it loaded
    queued: int  # tokens waiting (queue and window)


async def _counters(client: httpx.AsyncClient) -> Counters:
    text = (await client.get("/metrics")).text

    def value(name: str) -> int:
        match = re.search(rf'^{name}\{{model="tiny"\}} ([0-9.e+]+)$', text, re.M)
        return int(float(match.group(1))) if match else 0

    return Counters(value("rerank_real_tokens_total"), value("rerank_queue_tokens"))


@dataclass
class Sample:
    latency_s: float
    queued: int  # the others' tokens queued when it was sent
    others_scored: int  # tokens the model scored for the others while it was outstanding

    @property
    def share(self) -> float:
        return self.others_scored / max(self.queued, 1)


async def _sample(client: httpx.AsyncClient, body: dict, headers: dict) -> Sample:
    before = await _counters(client)
    start = time.perf_counter()
    r = await client.post("/v1/rerank", json=body, headers=headers)
    latency = time.perf_counter() - start
    assert r.status_code == 200, r.text
    after = await _counters(client)
    await asyncio.sleep(0.005)
    return Sample(latency, before.queued, after.scored - before.scored - int(r.headers["x-compute-tokens"]))


async def _measure(url: str, *, small: dict, small_headers: dict, big: dict, big_headers: dict, loops: int, min_queued: int) -> dict:
    """The small requests alone (latency only), then while `loops` clients keep the big request queued: each
    small request once the queue holds at least `min_queued` tokens (they wait for a resubmitted big request
    to be tokenized)."""
    body = json.dumps(big).encode()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for _ in range(5):  # warm
            await _sample(client, small, small_headers)
        idle = [await _sample(client, small, small_headers) for _ in range(20)]

        async def keep_queueing() -> None:
            while True:
                r = await client.post("/v1/rerank", content=body, headers={**big_headers, "Content-Type": "application/json"})
                assert r.status_code == 200, r.text

        tasks = [asyncio.create_task(keep_queueing()) for _ in range(loops)]
        loaded: list[Sample] = []
        try:
            while len(loaded) < SAMPLES:
                deadline = time.monotonic() + 300
                while (await _counters(client)).queued < min_queued:
                    assert time.monotonic() < deadline, "the big requests were never queued"
                    await asyncio.sleep(0.02)
                sample = await _sample(client, small, small_headers)
                if sample.queued < min_queued:
                    continue  # a big request completed between the two reads
                # First in, first out waits for the whole queue: stop at the first one.
                assert sample.share < 1.0, f"a small request waited while the model scored {sample.others_scored} of the {sample.queued} tokens queued before it"
                loaded.append(sample)
        finally:
            for task in tasks:
                task.cancel()  # the server cancels their queued pairs when the connections drop
            await asyncio.gather(*tasks, return_exceptions=True)
    return {"idle": idle, "loaded": loaded}


def _report(result: dict) -> str:
    idle, loaded = [s.latency_s for s in result["idle"]], [s.latency_s for s in result["loaded"]]
    shares = [s.share for s in result["loaded"]]
    return (
        f"share of the others' queue scored while a small request waited: p50 {_pct(shares, 0.5):.4f} p90 {_pct(shares, 0.9):.4f} "
        f"max {max(shares):.4f} (bound p90 < {SHARE_P90}; FIFO >= 1); queued >= {min(s.queued for s in result['loaded'])} tokens; "
        f"latency alone p50 {_pct(idle, 0.5) * 1e3:.0f} ms p99 {_pct(idle, 0.99) * 1e3:.0f} ms, "
        f"beside the queue p50 {_pct(loaded, 0.5) * 1e3:.0f} ms p99 {_pct(loaded, 0.99) * 1e3:.0f} ms ({_pct(loaded, 0.99) / _pct(idle, 0.99):.2f}x)"
    )


def test_small_tenant_is_not_queued_behind_another_tenants_backlog(server):
    """Tenant A keeps four 10,000-document requests queued (tens of thousands of pairs); tenant B's
    20-document requests are each scored after a few of A's batches, not after A's backlog."""
    result = asyncio.run(_measure(
        server,
        small={"query": "where do cats sleep", "documents": _docs(20, 1)}, small_headers={"Authorization": f"Bearer {KEYS['beta']}"},
        big={"query": "where do cats sleep", "documents": _docs(10_000, 2), "top_n": 100}, big_headers={"Authorization": f"Bearer {KEYS['alpha']}"},
        loops=4, min_queued=64 * BUDGET,
    ))
    report = _report(result)
    print(report)
    assert _pct([s.share for s in result["loaded"]], 0.9) < SHARE_P90, report


# Issue 9's case. Without fair sharing inside a tenant the searches waited for the whole bulk request:
# 2,468 ms against 13 ms alone (190x). The latency bound it had (p99 within 3x of alone) is README's
# measured figure now, printed here.
def test_small_searches_do_not_wait_behind_a_bulk_request_of_their_own_tenant(server):
    """Two 2,000-document requests of tenant alpha kept queued; alpha's own 3-document searches are each
    scored after a few (shrunk) bulk batches, not after the bulk requests."""
    alpha = {"Authorization": f"Bearer {KEYS['alpha']}"}
    result = asyncio.run(_measure(
        server,
        small={"query": "where do cats sleep", "documents": _docs(3, 1)}, small_headers=alpha,
        big={"query": "where do cats sleep", "documents": _docs(2_000, 2), "top_n": 10}, big_headers=alpha,
        loops=2, min_queued=32 * BUDGET,
    ))
    report = _report(result)
    print(report)
    assert _pct([s.share for s in result["loaded"]], 0.9) < SHARE_P90, report
