"""Tenants over real HTTP: API keys, model access, per-tenant limits, the usage ledger, the keys CLI."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from ops.cli import main as cli_main
from core.config import RegistryError, parse_registry
from tests.tenant_fixtures import ADMIN_KEY, KEYS, bearer, key_sha256, registry, rerank_body, tiny_bert_dir

# Serial (`make test` runs these after the parallel part, alone): a test's requests must fit in one 2 s
# rate window, in wall time.
pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.getbasetemp())


def client(reg) -> TestClient:
    return TestClient(create_app(reg, wait_for_models=True))


def assert_error(r, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"id", "message"}, body
    assert fragment in body["message"], body


def wait_for_window_start(window_s: float) -> None:
    """The limiter counts in fixed windows aligned to the epoch: start a test just after a boundary so all
    its requests fall into one window."""
    time.sleep(window_s - time.time() % window_s + 0.02)


# --- keys ----------------------------------------------------------------------------------------------


def test_api_keys_none_wrong_right_and_x_api_key(model_dir, tmp_path):
    reg = registry(model_dir, tenants={"alpha": {}, "beta": {}}, usage={"path": str(tmp_path / "u.db")})
    with client(reg) as c:
        assert_error(c.post("/v1/rerank", json=rerank_body()), 401, "no API key")
        assert_error(c.post("/v1/rerank", json=rerank_body(), headers=bearer("not-a-key")), 401, "invalid API key")
        assert_error(c.post("/v2/rerank", json=rerank_body(model="tiny"), headers={"X-API-Key": "nope"}), 401, "invalid API key")
        # The Cohere SDK's header, any capitalisation of the scheme, and X-API-Key all work.
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        assert c.post("/v2/rerank", json=rerank_body(model="tiny"), headers={"authorization": f"bearer {KEYS['beta']}"}).status_code == 200
        assert c.post("/v1/rerank", json=rerank_body(), headers={"X-API-Key": KEYS["beta"]}).status_code == 200
        # 401 comes before the body is even parsed: an unauthenticated client learns nothing from it.
        assert_error(c.post("/v1/rerank", content=b"{not json"), 401, "no API key")
        assert_error(c.get("/v1/models"), 401, "no API key")
        assert_error(c.get("/v1/usage"), 401, "no API key")
        # Health, readiness and metrics stay open for probes and scrapers.
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_a_tenant_may_hold_several_keys(model_dir, tmp_path):
    reg = parse_registry(
        {
            "default_model": "tiny",
            "models": {"tiny": {"backend": "embedding", "source": str(model_dir), "max_length": 64, "runtime": "torch"}},
            "tenants": {"alpha": {"api_key_sha256": [key_sha256("old-key"), key_sha256("new-key")]}},
            "usage": {"path": str(tmp_path / "u.db")},
        }
    )
    with client(reg) as c:
        for key in ("old-key", "new-key"):
            assert c.post("/v1/rerank", json=rerank_body(), headers=bearer(key)).status_code == 200
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("other-key")).status_code == 401


def test_key_revoked_by_a_changed_registry(model_dir, tmp_path):
    usage = {"path": str(tmp_path / "u.db")}
    before = registry(model_dir, tenants={"alpha": {}, "beta": {}}, usage=usage)
    with client(before) as c:
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
    # alpha's key is rotated out: the app built from the new registry refuses the old key.
    after = registry(model_dir, tenants={"alpha": {"api_key_sha256": key_sha256("rotated-key")}, "beta": {}}, usage=usage)
    with client(after) as c:
        assert_error(c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")), 401, "invalid API key")
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("rotated-key")).status_code == 200
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("beta")).status_code == 200


def test_no_tenants_means_open_single_user_mode(model_dir, tmp_path):
    reg = registry(model_dir, usage={"path": str(tmp_path / "u.db")})
    with client(reg) as c:
        assert c.post("/v1/rerank", json=rerank_body()).status_code == 200
        # A key is ignored rather than refused.
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("anything")).status_code == 200
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {"tiny", "other"}
        usage = c.get("/v1/usage").json()
        assert usage["tenant"] == "" and usage["total"]["requests"] == 2
        # Without tenants and without an admin key, the single user administers the gateway too.
        assert c.get("/admin/usage").status_code == 200


# --- model access --------------------------------------------------------------------------------------


def test_model_access_and_filtered_model_list(model_dir, tmp_path):
    reg = registry(model_dir, tenants={"alpha": {"models": ["tiny-alias"]}, "beta": {"models": ["*"]}}, usage={"path": str(tmp_path / "u.db")})
    with client(reg) as c:
        # An allowed model by its id, by an alias, and as the default.
        for model in ("tiny", "tiny-alias", None):
            assert c.post("/v1/rerank", json=rerank_body(model=model), headers=bearer("alpha")).status_code == 200
        # Another tenant's model answers exactly as an unknown one: its existence is not revealed.
        for model in ("other", "other-alias"):
            r = c.post("/v2/rerank", json=rerank_body(model=model), headers=bearer("alpha"))
            assert_error(r, 404, f"model {model!r} not found; available: tiny, tiny-alias")
        # An unknown name is 404, and the message lists only alpha's own models.
        r = c.post("/v1/rerank", json=rerank_body(model="nope"), headers=bearer("alpha"))
        assert_error(r, 404, "not found")
        assert "other" not in r.json()["message"]
        assert [m["id"] for m in c.get("/v1/models", headers=bearer("alpha")).json()["data"]] == ["tiny"]
        assert {m["id"] for m in c.get("/v1/models", headers=bearer("beta")).json()["data"]} == {"tiny", "other"}
        assert c.post("/v1/rerank", json=rerank_body(model="other"), headers=bearer("beta")).status_code == 200


# --- admin ---------------------------------------------------------------------------------------------


def test_admin_endpoints_take_the_admin_key_only(model_dir, tmp_path):
    usage = {"path": str(tmp_path / "u.db")}
    reg = registry(model_dir, tenants={"alpha": {}}, usage=usage, admin_api_key_sha256=key_sha256(ADMIN_KEY))
    with client(reg) as c:
        assert_error(c.get("/admin/usage"), 401, "admin")
        assert_error(c.get("/admin/usage", headers=bearer("wrong")), 401, "invalid API key")
        assert_error(c.get("/admin/usage", headers=bearer("alpha")), 403, "not the admin key")
        assert c.get("/admin/usage", headers={"X-API-Key": ADMIN_KEY}).status_code == 200
        # The admin key is not a tenant key.
        assert_error(c.post("/v1/rerank", json=rerank_body(), headers=bearer(ADMIN_KEY)), 401, "invalid API key")
    # Tenants but no admin key configured: admin endpoints are off, whatever key is sent.
    with client(registry(model_dir, tenants={"alpha": {}}, usage=usage)) as c:
        assert_error(c.get("/admin/usage", headers=bearer("alpha")), 403, "disabled")


# --- limits --------------------------------------------------------------------------------------------


def test_requests_per_minute_429_with_retry_after_then_reset(model_dir, tmp_path):
    window = 2.0
    reg = registry(
        model_dir,
        tenants={"alpha": {"requests_per_minute": 2}, "beta": {}},
        usage={"path": str(tmp_path / "u.db")},
        limits={"rate_window_s": window},
    )
    with client(reg) as c:
        wait_for_window_start(window)
        for _ in range(2):
            assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        r = c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha"))
        assert_error(r, 429, "2 requests per minute")
        retry_after = int(r.headers["Retry-After"])
        assert 1 <= retry_after <= window
        # Another tenant is not affected.
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("beta")).status_code == 200
        time.sleep(retry_after)
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        assert 'rerank_limited_requests_total{limit="rate",tenant="alpha"} 1.0' in c.get("/metrics").text


def test_search_units_per_day_counts_chunks_then_resets(model_dir, tmp_path):
    window = 2.0
    reg = registry(
        model_dir,
        tenants={"alpha": {"search_units_per_day": 3}},
        usage={"path": str(tmp_path / "u.db")},
        limits={"quota_window_s": window},
    )
    long_doc = " ".join(["cats sleep on warm sofas"] * 40)  # ~200 tokens: 2 chunks of max_length 128
    with client(reg) as c:
        wait_for_window_start(window)
        # 60 documents chunked in two: 120 scored units = 2 search units (not 1).
        r = c.post("/v1/rerank", json={"query": "cats", "documents": [long_doc] * 60, "max_chunks_per_doc": 2}, headers=bearer("alpha"))
        assert r.status_code == 200, r.text
        assert r.json()["meta"]["billed_units"]["search_units"] == 2
        # 150 documents would be 2 more units: 4 > 3.
        r = c.post("/v1/rerank", json=rerank_body(150), headers=bearer("alpha"))
        assert_error(r, 429, "3 search units per day")
        assert 1 <= int(r.headers["Retry-After"]) <= window
        # A refused request costs nothing: one more unit still fits.
        assert c.post("/v1/rerank", json=rerank_body(50), headers=bearer("alpha")).status_code == 200
        assert c.post("/v1/rerank", json=rerank_body(1), headers=bearer("alpha")).status_code == 429
        time.sleep(int(r.headers["Retry-After"]))
        assert c.post("/v1/rerank", json=rerank_body(1), headers=bearer("alpha")).status_code == 200


def test_max_concurrent_requests(model_dir, tmp_path):
    reg = registry(model_dir, tenants={"alpha": {"max_concurrent_requests": 1}}, usage={"path": str(tmp_path / "u.db")})
    with client(reg) as c:
        scheduler = c.app.state.pipeline.pool.entries["tiny"].scheduler
        statuses: list[int] = []
        big = threading.Thread(target=lambda: statuses.append(c.post("/v1/rerank", json=rerank_body(5000), headers=bearer("alpha")).status_code))
        big.start()
        deadline = time.monotonic() + 30
        while scheduler.queue_depth()[0] == 0:  # the big request holds its slot while it is queued
            assert time.monotonic() < deadline and big.is_alive()
            time.sleep(0.005)
        r = c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha"))
        assert_error(r, 429, "1 concurrent requests")
        assert r.headers["Retry-After"] == "1"
        big.join()
        assert statuses == [200]
        # The slot is back once the first request is answered.
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200


# --- usage ---------------------------------------------------------------------------------------------


def test_usage_is_durable_before_the_answer_and_survives_a_restart(model_dir, tmp_path):
    path = tmp_path / "usage.sqlite3"
    reg = registry(
        model_dir, tenants={"alpha": {}, "beta": {}}, usage={"path": str(path)}, admin_api_key_sha256=key_sha256(ADMIN_KEY)
    )
    with client(reg) as c:
        for n in (3, 20, 150):
            assert c.post("/v1/rerank", json=rerank_body(n), headers=bearer("alpha")).status_code == 200
        assert c.post("/v2/rerank", json=rerank_body(5, model="other-alias"), headers=bearer("beta")).status_code == 200
        # Failed and refused requests are not billed.
        assert c.post("/v1/rerank", json=rerank_body(model="nope"), headers=bearer("alpha")).status_code == 404
        # Acknowledged means committed: another connection sees the rows while the gateway still runs.
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT tenant, model, requests, documents, search_units FROM usage ORDER BY tenant").fetchall()
        assert rows == [("alpha", "tiny", 3, 173, 4), ("beta", "other", 1, 5, 1)]
        mine = c.get("/v1/usage", headers=bearer("alpha")).json()
    assert mine["tenant"] == "alpha"
    assert mine["total"]["requests"] == 3 and mine["total"]["documents"] == 173 and mine["total"]["search_units"] == 4
    assert mine["total"]["tokens"] > 0
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", mine["data"][0]["date"])
    # A new process on the same ledger: nothing lost.
    with client(reg) as c:
        assert c.get("/v1/usage", headers=bearer("alpha")).json() == mine
        beta = c.get("/v1/usage", headers=bearer("beta")).json()
        assert beta["total"]["requests"] == 1 and [d["model"] for d in beta["data"]] == ["other"]
        everyone = c.get("/admin/usage", headers=bearer(ADMIN_KEY)).json()
        assert {(d["tenant"], d["requests"]) for d in everyone["data"]} == {("alpha", 3), ("beta", 1)}
        assert everyone["total"]["requests"] == 4
        only_beta = c.get("/admin/usage", params={"tenant": "beta"}, headers=bearer(ADMIN_KEY)).json()
        assert only_beta["total"]["requests"] == 1
        today = mine["data"][0]["date"]
        assert c.get("/v1/usage", params={"since": today, "until": today}, headers=bearer("alpha")).json()["total"]["requests"] == 3
        assert c.get("/v1/usage", params={"since": "2999-01-01"}, headers=bearer("alpha")).json()["data"] == []
        assert_error(c.get("/v1/usage", params={"since": "yesterday"}, headers=bearer("alpha")), 400, "YYYY-MM-DD")


def test_prometheus_counters_carry_the_tenant(model_dir, tmp_path):
    reg = registry(model_dir, tenants={"alpha": {}}, usage={"path": str(tmp_path / "u.db")})
    with client(reg) as c:
        assert c.post("/v1/rerank", json=rerank_body(150), headers=bearer("alpha")).status_code == 200
        text = c.get("/metrics").text
    assert 'rerank_requests_total{model="tiny",status="200",tenant="alpha"} 1.0' in text
    assert 'rerank_search_units_total{model="tiny",tenant="alpha"} 2.0' in text
    assert 'rerank_documents_total{model="tiny",tenant="alpha"} 150.0' in text


# --- fair-share weight, CLI, registry checks ----------------------------------------------------------


def test_tenant_priority_becomes_the_scheduler_weight(model_dir, tmp_path):
    from tenancy.auth import authenticate

    reg = registry(model_dir, tenants={"alpha": {"priority": 3}, "beta": {}}, usage={"path": str(tmp_path / "u.db")})
    assert authenticate({"authorization": f"Bearer {KEYS['alpha']}"}, reg).weight == 3
    assert authenticate({"x-api-key": KEYS["beta"]}, reg).weight == 1
    with client(reg) as c:
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        queue = c.app.state.pipeline.pool.entries["tiny"].scheduler._queue
        assert queue.tenants["alpha"].weight == 3


def test_keys_new_prints_a_key_and_the_line_to_paste(model_dir, tmp_path, capsys):
    assert cli_main(["keys", "new", "acme"]) == 0
    out = capsys.readouterr().out
    key = next(line for line in out.splitlines() if line.startswith("rg-"))
    digest = re.search(r"api_key_sha256: ([0-9a-f]{64})", out).group(1)
    assert hashlib.sha256(key.encode()).hexdigest() == digest
    assert len(key) > 40
    assert cli_main(["keys", "new", "acme"]) == 0
    assert key not in capsys.readouterr().out  # fresh every time
    # Pasted into a registry, the key works.
    reg = parse_registry(
        {
            "default_model": "tiny",
            "models": {"tiny": {"backend": "embedding", "source": str(model_dir), "max_length": 64, "runtime": "torch"}},
            "tenants": {"acme": {"api_key_sha256": digest}},
            "usage": {"path": str(tmp_path / "u.db")},
        }
    )
    with client(reg) as c:
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer(key)).status_code == 200
    assert cli_main(["keys", "new", "--admin"]) == 0
    assert "admin_api_key_sha256: " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tenants": {"a": {"api_key_sha256": "A" * 64}}}, "not a lowercase hex sha256"),
        ({"admin_api_key_sha256": "nothex"}, "admin_api_key_sha256: not a lowercase hex sha256"),
        ({"tenants": {"a": {"api_key_sha256": "a" * 64}, "b": {"api_key_sha256": "a" * 64}}}, "same key hash"),
        ({"tenants": {"a": {"api_key_sha256": "a" * 64}}, "admin_api_key_sha256": "a" * 64}, "same key hash"),
        ({"tenants": {"a": {"api_key_sha256": "a" * 64, "priority": 0}}}, "priority: must be > 0"),
        ({"tenants": {"a": {"api_key_sha256": "a" * 64, "models": ["nope"]}}}, "unknown model 'nope'"),
        ({"tenants": {"a": {"api_key_sha256": "a" * 64, "requests_per_minute": -1}}}, "must be >= 0"),
        ({"limits": {"backend": "redis"}}, "limits.url: required"),
        ({"limits": {"rate_window_s": 0}}, "must be > 0"),
    ],
)
def test_registry_refuses_bad_tenant_config(change, message):
    data = {"default_model": "m", "models": {"m": {"backend": "embedding", "source": "x"}}, **change}
    with pytest.raises(RegistryError, match=re.escape(message)):
        parse_registry(data)
