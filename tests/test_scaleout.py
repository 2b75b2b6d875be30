"""The scale-out topology as real processes on 127.0.0.1: front doors (`backend: remote`, `dialect: gateway`),
two workers and a real redis-server. What Kubernetes does to pods, done to processes: a worker SIGKILLed
under load, a rolling restart (SIGTERM one worker at a time, each drains and comes back on its address),
and two gateway processes (the workers) holding one tenant's global rate limit through Redis. One topology
serves the module; each test leaves both workers up and in the front door's pool."""

from __future__ import annotations

import contextlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml

from tests.conftest import MINILM, free_port, serve_process
from tests.load import Load
from tests.routes_fixtures import wait_for
from tenancy.auth import key_sha256
from tests.tenant_fixtures import RedisServer

TENANT_KEY, WORKER_KEY = "rg-scaleout-tenant", "rg-scaleout-frontdoor-to-workers"
BODY = {"model": "minilm", "query": "what is a cat", "documents": ["a cat is an animal", "paris is in france", "cats purr"]}





@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _local(tenants: dict, limits: dict | None = None, server: dict | None = None) -> dict:
    data = {
        "default_model": "minilm",
        "models": {"minilm": {"backend": "embedding", "source": MINILM, "max_length": 64, "cpu_streams": 1, "runtime": "torch"}},
        "usage": {"path": None},
        "tenants": tenants,
        "server": {"request_timeout_s": 30, **(server or {})},
    }
    if limits:
        data["limits"] = limits
    return data


def _start_together(stack: contextlib.ExitStack, *servers) -> list:
    """Enter several serve_process contexts at once: the processes load their models in parallel."""
    with ThreadPoolExecutor(len(servers)) as pool:
        return list(pool.map(stack.enter_context, servers))


# The tenant the rate-limit test holds to `RATE_LIMIT` requests per `RATE_WINDOW_S` across both workers. The
# front door calls the workers as its own tenant, which has no limit, so the other tests never meet it.
RATE_LIMIT, RATE_WINDOW_S = 30, 1.5


@contextlib.contextmanager
def topology(tmp_path: Path, redis: RedisServer, drain_s: float = 10.0) -> Iterator[dict]:
    """Two workers on fixed ports (a restarted one comes back on its address, as a pod behind its Service
    does) and a front door whose registry lists both as one endpoint pool. The workers share their tenants'
    limits through Redis, as two replicas behind one Service do."""
    drain = {"drain_timeout_s": drain_s}
    tenants = {
        "frontdoor": {"api_key_sha256": key_sha256(WORKER_KEY)},
        "acme": {"api_key_sha256": key_sha256(TENANT_KEY), "requests_per_minute": RATE_LIMIT},
    }
    limits = {"backend": "redis", "url": redis.url, "rate_window_s": RATE_WINDOW_S}
    worker_registry = _write(tmp_path / "worker.yaml", _local(tenants, limits=limits, server=drain))
    ports = [free_port(), free_port()]
    front_registry = _write(tmp_path / "frontdoor.yaml", {
        "default_model": "minilm",
        "usage": {"path": None},
        "limits": {"backend": "redis", "url": redis.url},
        "tenants": {"acme": {"api_key_sha256": key_sha256(TENANT_KEY)}},
        "models": {"minilm": {
            "backend": "remote", "dialect": "gateway", "upstream_model": "minilm",
            "endpoints": [f"http://127.0.0.1:{p}" for p in ports], "api_key_env": "WORKER_API_KEY", "timeout_s": 20,
        }},
    })
    json_logs = ("--log-format", "json")
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(tmp_path / f"worker-{i}.log", "a")) for i in range(2)]

        def worker(i: int):
            return serve_process(worker_registry, port=ports[i], log=logs[i], extra_args=json_logs)

        workers = _start_together(stack, worker(0), worker(1))
        front_url, _ = stack.enter_context(serve_process(front_registry, env={"WORKER_API_KEY": WORKER_KEY}, extra_args=json_logs))
        yield {"front": front_url, "workers": workers, "restart": worker, "stack": stack, "logs": [Path(f.name) for f in logs]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server) -> Iterator[dict]:
    """One topology for the module (three server starts, not three per test). Each test leaves both workers
    serving and back in the front door's pool."""
    with topology(tmp_path_factory.mktemp("scaleout"), redis_server) as t:
        yield t


def _restart(t: dict, i: int) -> None:
    """Worker i again on its address, and back in the front door's pool (the pool probes it once its
    cool-down is over): decided by the front door's own report, not by a pause."""
    t["workers"][i] = t["stack"].enter_context(t["restart"](i))
    wait_for(lambda: _both_in_pool(t["front"]), timeout_s=60, what=f"worker {i} back in the front door's pool")


def _both_in_pool(front: str) -> bool:
    auth = {"Authorization": f"Bearer {TENANT_KEY}"}
    # A request, so that the pool probes an ejected endpoint whose cool-down is over (probes ride on calls).
    assert httpx.post(f"{front}/v2/rerank", json=BODY, headers=auth, timeout=30).status_code == 200
    (model,) = httpx.get(f"{front}/v1/models", headers=auth, timeout=10).json()["data"]
    return [e["state"] for e in model["upstream"]["endpoints"]] == ["up", "up"]


@pytest.mark.serial  # the load must reach the limit inside each 1 s window: a starved machine did not
def test_two_workers_share_one_tenant_rate_limit_through_redis(cluster):
    """A tenant allowed `limit` requests per window gets that many across two processes, not twice as many."""
    limit, windows = RATE_LIMIT, 2
    one, two = (f"http://127.0.0.1:{_port(url)}" for url, _ in cluster["workers"])
    # Start at a window boundary (the windows are aligned to the epoch on Redis's clock, which is ours).
    now = time.time()
    time.sleep(math.floor(now / RATE_WINDOW_S) * RATE_WINDOW_S + RATE_WINDOW_S + 0.05 - now)
    end = time.monotonic() + windows * RATE_WINDOW_S - 0.15
    counts = {one: [0, 0], two: [0, 0]}  # url -> [admitted, refused]

    def hammer(url: str) -> None:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {TENANT_KEY}"}) as client:
            while time.monotonic() < end:
                status = client.post(f"{url}/v2/rerank", json=BODY).status_code
                assert status in (200, 429), status
                counts[url][0 if status == 200 else 1] += 1
                if status == 429:
                    time.sleep(0.01)

    threads = [threading.Thread(target=hammer, args=(url,)) for url in (one, two, one, two)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    admitted = counts[one][0] + counts[two][0]
    assert counts[one][1] + counts[two][1] > 0, "the load never reached the limit"
    assert counts[one][0] > 0 and counts[two][0] > 0, counts
    assert abs(admitted - limit * windows) <= 0.1 * limit * windows, (admitted, counts)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_worker_killed_under_load_loses_no_client_request(cluster):
    t = cluster
    # The request id a client sends reaches the worker that answers (its JSON access line) and comes back.
    answer = httpx.post(f"{t['front']}/v2/rerank", json=BODY, timeout=30, headers={"Authorization": f"Bearer {TENANT_KEY}", "X-Request-Id": "e2e-trace-1"})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "e2e-trace-1"
    wait_for(lambda: any("e2e-trace-1" in f.read_text() for f in t["logs"]), timeout_s=10, what="the worker's access line")
    seen = [json.loads(line) for f in t["logs"] for line in f.read_text().splitlines() if "e2e-trace-1" in line]
    assert any(r["logger"] == "rerank_gateway.access" and r["tenant"] == "frontdoor" and r["status"] == 200 for r in seen), seen

    victim_log = t["logs"][0]
    served_before = victim_log.read_text().count('"status": 200')
    with Load(t["front"], BODY, clients=3, headers={"Authorization": f"Bearer {TENANT_KEY}"}) as load:
        # The victim was taking its share of the load when it died.
        wait_for(lambda: victim_log.read_text().count('"status": 200') > served_before, timeout_s=20, what="worker 0 serving the load")
        _, victim = t["workers"][0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed_at = len(load.results)
        # Load keeps going on the survivor alone for a while.
        wait_for(lambda: len(load.results) > killed_at + 20, timeout_s=30, what="answers after the kill")
    answered = len(load.results)
    assert answered > 20 and load.failed() == [], load.failed()[:5]
    # The survivor answers on its own afterwards.
    assert httpx.post(f"{t['front']}/v2/rerank", json=BODY, headers={"Authorization": f"Bearer {TENANT_KEY}"}, timeout=30).status_code == 200
    _restart(t, 0)


def test_rolling_restart_of_both_workers_loses_no_client_request(cluster):
    t = cluster
    with Load(t["front"], BODY, clients=3, headers={"Authorization": f"Bearer {TENANT_KEY}"}) as load:
        for i in range(2):
            served = len(load.results)
            wait_for(lambda: len(load.results) > served + 5, timeout_s=30, what="load flowing")
            _, proc = t["workers"][i]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10.0 + 5) == 0  # drained and exited cleanly, within the drain bound
            # The replacement comes up on the same address, as a new pod behind the Service.
            _restart(t, i)
        served = len(load.results)
        wait_for(lambda: len(load.results) > served + 5, timeout_s=30, what="load flowing on both new workers")
    assert len(load.results) > 20 and load.failed() == [], load.failed()[:5]
