"""Limits shared through a real redis-server: two gateway instances, one budget; Redis killed mid-test."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis
from litestar.testing import TestClient

from gateway.app import create_app
from tests.tenant_fixtures import RedisServer, bearer, registry, rerank_body, tiny_bert_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.getbasetemp())


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def redis_registry(model_dir, tmp_path, server: RedisServer, tenants: dict, on_failure: str = "open"):
    return registry(
        model_dir,
        tenants=tenants,
        usage={"path": str(tmp_path / "usage.sqlite3")},
        limits={"backend": "redis", "url": server.url, "on_failure": on_failure},
    )


class LogLines(logging.Handler):
    """Records one logger's messages. (caplog's root handler does not survive Litestar's logging setup.)"""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.WARNING)
        self.logger = logging.getLogger(logger)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "LogLines":
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def client(reg) -> TestClient:
    return TestClient(create_app(reg, wait_for_models=True))


def test_two_gateway_instances_share_one_budget(model_dir, tmp_path, redis_server):
    reg = redis_registry(
        model_dir,
        tmp_path,
        redis_server,
        {"alpha": {"requests_per_minute": 4}, "beta": {"search_units_per_day": 3}, "gamma": {"max_concurrent_requests": 1}},
    )
    with client(reg) as one, client(reg) as two:
        # Requests per minute: 2 + 2 across the instances, then both refuse.
        for c in (one, two, one, two):
            assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        for c in (one, two):
            r = c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha"))
            assert r.status_code == 429, r.text
            assert 1 <= int(r.headers["Retry-After"]) <= 60
        # Search units: 2 spent on one, so 2 more do not fit on two, 1 does.
        assert one.post("/v1/rerank", json=rerank_body(150), headers=bearer("beta")).status_code == 200
        r = two.post("/v1/rerank", json=rerank_body(150), headers=bearer("beta"))
        assert r.status_code == 429 and "3 search units per day" in r.json()["message"]
        assert two.post("/v1/rerank", json=rerank_body(50), headers=bearer("beta")).status_code == 200
        # Concurrency: a request in flight on one takes the slot from two.
        scheduler = one.app.state.pipeline.pool.entries["tiny"].scheduler
        statuses: list[int] = []
        held = threading.Thread(target=lambda: statuses.append(one.post("/v1/rerank", json=rerank_body(5000), headers=bearer("gamma")).status_code))
        held.start()
        deadline = time.monotonic() + 30
        while scheduler.queue_depth()[0] == 0:
            assert time.monotonic() < deadline and held.is_alive()
            time.sleep(0.005)
        r = two.post("/v1/rerank", json=rerank_body(), headers=bearer("gamma"))
        assert r.status_code == 429 and "concurrent" in r.json()["message"]
        held.join()
        assert statuses == [200]
        assert two.post("/v1/rerank", json=rerank_body(), headers=bearer("gamma")).status_code == 200
        assert one.get("/ready").json()["limits"] == "ok"
    # The budget lives in Redis, not in either process.
    store = redis.Redis(port=redis_server.port)
    assert store.keys("rerank-gateway:{alpha}:req:*") and store.keys("rerank-gateway:{beta}:units:*")
    assert store.zcard("rerank-gateway:{gamma}:active") == 0  # every slot given back


def test_redis_killed_fail_open_keeps_serving_and_says_so(model_dir, tmp_path, redis_server):
    reg = redis_registry(model_dir, tmp_path, redis_server, {"alpha": {"requests_per_minute": 2}}, on_failure="open")
    with client(reg) as c:
        for _ in range(2):
            assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 429
        assert c.get("/ready").json()["limits"] == "ok"

        redis_server.stop()
        with LogLines("rerank_gateway.limits") as log:
            # Over the limit, but the limits cannot be checked: served, as the policy says.
            for _ in range(3):
                assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
            ready = c.get("/ready")
            assert ready.status_code == 200
            status = ready.json()["limits"]
            assert status.startswith("degraded: redis at 127.0.0.1:") and "on_failure: open" in status
            assert any("limits store failed" in line and "on_failure: open" in line for line in log.lines)

            redis_server.start()  # back, empty
            time.sleep(1.1)  # past the retry pause
            assert c.get("/ready").json()["limits"] == "ok"
            assert any("recovered" in line for line in log.lines)
        for _ in range(2):
            assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 429


def test_redis_killed_fail_closed_refuses_limited_tenants(model_dir, tmp_path, redis_server):
    reg = redis_registry(
        model_dir, tmp_path, redis_server, {"alpha": {"requests_per_minute": 100}, "beta": {}}, on_failure="closed"
    )
    with client(reg) as c:
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        redis_server.stop()
        r = c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha"))
        assert r.status_code == 503, r.text
        assert "rate limits cannot be checked" in r.json()["message"] and r.headers["Retry-After"] == "1"
        status = c.get("/ready").json()["limits"]
        assert status.startswith("degraded:") and "on_failure: closed" in status
        # A tenant with no limits never needed the store.
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("beta")).status_code == 200
        redis_server.start()
        time.sleep(1.1)
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        assert c.get("/ready").json()["limits"] == "ok"
