"""The usage ledger under faults and load: a row is written whatever happens to the request waiting for
it, every request is billed once however many commit together, and a ledger that cannot write fails the
request (a 503 in the dialect's shape) and gives its search units back."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from tenancy.usage import UsageStore
from tests.tenant_fixtures import bearer, registry, rerank_body, tiny_bert_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.getbasetemp())


def test_a_row_is_written_though_its_wait_is_cancelled_and_close_writes_every_queued_row(tmp_path):
    path = str(tmp_path / "u.db")

    async def go():
        store = await UsageStore(path).open()
        gone = asyncio.ensure_future(store.record("alpha", "m", documents=3, search_units=1, tokens=10))
        await asyncio.sleep(0)  # its row is queued and it waits for the commit
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        # Rows queued just before close are written before the ledger closes.
        last = [asyncio.ensure_future(store.record("beta", "m", documents=1, search_units=1, tokens=5)) for _ in range(50)]
        await asyncio.sleep(0)
        await store.close()
        await asyncio.gather(*last)
        again = await UsageStore(path).open()
        rows = await again.rows()
        await again.close()
        return rows

    rows = asyncio.run(asyncio.wait_for(go(), 60))
    assert [(r.tenant, r.requests, r.documents, r.tokens) for r in rows] == [("alpha", 1, 3, 10), ("beta", 50, 50, 250)]


def test_concurrent_requests_are_each_billed_once(model_dir, tmp_path):
    path = tmp_path / "u.db"
    reg = registry(model_dir, tenants={"alpha": {}, "beta": {}}, usage={"path": str(path)})
    with TestClient(create_app(reg, wait_for_models=True)) as c:

        def one(k: int) -> int:
            tenant = "alpha" if k % 3 else "beta"
            return c.post("/v1/rerank", json=rerank_body(1 + k % 4), headers=bearer(tenant)).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert set(pool.map(one, range(96))) == {200}
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT tenant, requests, documents FROM usage ORDER BY tenant").fetchall()
    want = {"alpha": [0, 0], "beta": [0, 0]}
    for k in range(96):
        counts = want["alpha" if k % 3 else "beta"]
        counts[0] += 1
        counts[1] += 1 + k % 4
    assert rows == [("alpha", *want["alpha"]), ("beta", *want["beta"])]


def test_a_ledger_that_cannot_write_fails_the_request_and_refunds_its_units(model_dir, tmp_path):
    path = tmp_path / "u.db"
    reg = registry(model_dir, tenants={"alpha": {"search_units_per_day": 3}}, usage={"path": str(path)})
    with TestClient(create_app(reg, wait_for_models=True)) as c:
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        # The disk fills up (as SQLite would see it): every write of the ledger fails.
        with sqlite3.connect(path) as db:
            for op in ("INSERT", "UPDATE"):
                db.execute(f"CREATE TRIGGER full_{op.lower()} BEFORE {op} ON usage BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        for dialect in ("/v1/rerank", "/v2/rerank"):
            r = c.post(dialect, json=rerank_body(model="tiny"), headers=bearer("alpha"))
            assert r.status_code == 503, r.text
            assert set(r.json()) == {"id", "message"} and "usage ledger unavailable" in r.json()["message"], r.text
        with sqlite3.connect(path) as db:
            for op in ("insert", "update"):
                db.execute(f"DROP TRIGGER full_{op}")
        # The failed requests' units were given back: two more fit in the day's 3, a third does not.
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 200
        assert c.post("/v1/rerank", json=rerank_body(), headers=bearer("alpha")).status_code == 429
        assert c.get("/v1/usage", headers=bearer("alpha")).json()["total"]["requests"] == 3
