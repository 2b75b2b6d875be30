"""A reload tells the truth about what it changes: limits and the usage ledger take effect, and a change
only a restart can apply (core.config.RESTART_ONLY_KEYS) is refused, naming the key, with nothing changed."""

from __future__ import annotations

import copy
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
import yaml
from litestar.testing import TestClient

from core.config import RESTART_ONLY_KEYS, ServerSettings, load_registry
from gateway.app import create_app
from tenancy.auth import key_sha256
from tenancy.limits import MemoryLimiter, RedisLimiter
from tests.tenant_fixtures import ADMIN_KEY, RedisServer, bearer, registry, rerank_body, tiny_bert_dir

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_bert_dir(tmp_path_factory.getbasetemp())


def _base(model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    reg = registry(
        model_dir,
        tenants={"alpha": {"requests_per_minute": 2}},
        admin_api_key_sha256=key_sha256(ADMIN_KEY),
        usage={"path": str(tmp_path / "first.sqlite3")},
        limits={"rate_window_s": 3600},
    )
    return msgspec.to_builtins(reg)


def _reload_to(client: TestClient, path: Path, data: dict[str, Any]):
    path.write_text(yaml.safe_dump(data))
    return client.post("/admin/reload", headers=ADMIN)


def _rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT tenant, requests FROM usage").fetchall()


@pytest.fixture
def gateway(model_dir, tmp_path):
    data = _base(model_dir, tmp_path)
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(data))
    app = create_app(load_registry(path), gpu_type="cpu", wait_for_models=True, registry_path=path)
    with TestClient(app, timeout=60) as client:
        yield client, path, data


def test_every_restart_only_key_is_refused_by_name(gateway):
    client, path, data = gateway
    served = client.app.state.pipeline.served
    defaults = ServerSettings()
    for key in RESTART_ONLY_KEYS:
        field = key.removeprefix("server.")
        changed = copy.deepcopy(data)
        changed.setdefault("server", {})[field] = getattr(defaults, field) + 1
        r = _reload_to(client, path, changed)
        assert r.status_code == 400, (key, r.text)
        assert "reload refused, the running configuration is unchanged" in r.json()["message"]
        assert key in r.json()["message"] and "restart" in r.json()["message"]
        assert client.app.state.pipeline.served is served
    both = copy.deepcopy(data)
    both["server"] = {"max_connections": 7, "drain_timeout_s": 3.0, "max_documents": 5}
    message = _reload_to(client, path, both).json()["message"]
    assert "server.max_connections" in message and "server.drain_timeout_s" in message and "max_documents" not in message
    # A server key a reload can change is applied: max_documents is read per request.
    only = copy.deepcopy(data)
    only["server"] = {"max_documents": 5}
    r = _reload_to(client, path, only)
    assert r.status_code == 200 and r.json()["changed"] == ["server.max_documents"]
    r = client.post("/v2/rerank", json=rerank_body(6), headers=bearer("alpha"))
    assert r.status_code == 400 and "the maximum is 5" in r.json()["message"]


def test_limits_apply_on_reload(gateway, tmp_path):
    client, path, data = gateway
    for _ in range(2):
        assert client.post("/v2/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
    assert client.post("/v2/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 429
    limiter = client.app.state.pipeline.limiter
    # Windows of one second instead of an hour: the same limiter, reconfigured; the next window is open.
    shorter = copy.deepcopy(data)
    shorter["limits"]["rate_window_s"] = 1.0
    r = _reload_to(client, path, shorter)
    assert r.status_code == 200 and r.json()["changed"] == ["limits.rate_window_s"]
    assert client.app.state.pipeline.limiter is limiter and limiter.config.rate_window_s == 1.0
    time.sleep(1.0)
    assert client.post("/v2/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
    # Another backend: a new limiter (Redis) counts from the next request on.
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        shared = copy.deepcopy(shorter)
        shared["limits"] |= {"backend": "redis", "url": server.url}
        r = _reload_to(client, path, shared)
        assert r.status_code == 200 and set(r.json()["changed"]) == {"limits.backend", "limits.url"}
        assert isinstance(client.app.state.pipeline.limiter, RedisLimiter) and isinstance(limiter, MemoryLimiter)
        assert client.post("/v2/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        assert redis.Redis.from_url(server.url).keys("rerank-gateway:{alpha}:req:*")
    finally:
        server.stop()


def test_the_usage_ledger_follows_usage_path_on_reload(gateway, tmp_path):
    client, path, data = gateway
    assert client.post("/v2/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
    first, second = tmp_path / "first.sqlite3", tmp_path / "second.sqlite3"
    assert _rows(first) == [("alpha", 1)]
    # A ledger that cannot be opened refuses the reload: nothing changed, the first ledger still records.
    unopenable = copy.deepcopy(data)
    unopenable["usage"]["path"] = str(first / "not-a-directory" / "u.sqlite3")
    r = _reload_to(client, path, unopenable)
    assert r.status_code == 400 and "usage.path" in r.json()["message"] and "cannot be opened" in r.json()["message"]
    moved = copy.deepcopy(data)
    moved["usage"]["path"] = str(second)
    r = _reload_to(client, path, moved)
    assert r.status_code == 200 and r.json()["changed"] == ["usage.path"]
    assert client.post("/v2/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
    assert _rows(second) == [("alpha", 1)] and _rows(first) == [("alpha", 1)]
    usage = client.get("/v1/usage", headers=bearer("alpha")).json()
    assert usage["total"]["requests"] == 1  # the ledger served now is the new one
