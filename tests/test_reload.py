"""Live registry reload: POST /admin/reload and SIGHUP in `rerank-gateway serve`. Weights, aliases and
limits change without dropping a request; models load or unload only when added, removed or changed;
a bad file is refused whole."""

from __future__ import annotations

import copy
import hashlib
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from litestar.testing import TestClient

from gateway.app import create_app
from core.config import load_registry, parse_registry
from tests.conftest import serve_process
from tests.routes_fixtures import DOCS, minilm, rerank, wait_for

ADMIN_KEY = "admin-key-for-the-reload-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

BASE = {
    "default_model": "search",
    "admin_api_key_sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
    "models": {"a": minilm(64), "b": minilm(8), "c": minilm(64)},
    "routes": {"search": {"split": {"a": 90, "b": 10}, "sticky": "user"}},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("reload") / "registry.yaml"
    path.write_text(yaml.safe_dump(BASE))
    app = create_app(load_registry(path), gpu_type="cpu", wait_for_models=True, registry_path=path)
    with TestClient(app, timeout=60) as client:
        yield client, path


@pytest.fixture
def gateway(served):
    """Each test starts from BASE (reloading it back when an earlier test changed the file)."""
    client, path = served
    if path.read_text() != yaml.safe_dump(BASE):
        _reload_to(client, path, BASE)
        wait_for(lambda: all(e.state == "ready" for e in _entries(client).values()), what="BASE models ready")
    return client, path


def _entries(client: TestClient) -> dict:
    return client.app.state.pipeline.pool.entries


def _reload_to(client: TestClient, path: Path, registry: dict | str):
    path.write_text(registry if isinstance(registry, str) else yaml.safe_dump(registry))
    return client.post("/admin/reload", headers=ADMIN)


def test_reload_needs_the_admin_key(gateway) -> None:
    client, _ = gateway
    assert client.post("/admin/reload").status_code == 401
    r = client.post("/admin/reload", headers={"Authorization": "Bearer not-the-key"})
    assert r.status_code == 401 and "invalid" in r.json()["message"]
    r = client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["models"] == {"added": [], "removed": [], "reloaded": [], "kept": ["a", "b", "c"]}


def test_flip_the_weights_live(gateway) -> None:
    client, path = gateway
    schedulers = {m: e.scheduler for m, e in _entries(client).items()}
    users = [f"user-{i}" for i in range(30)]
    before = {u: rerank(client, "search", documents=DOCS[:2], user=u).headers["x-rerank-model"] for u in users}
    assert list(before.values()).count("a") > list(before.values()).count("b")

    flipped = copy.deepcopy(BASE)
    flipped["routes"]["search"]["split"] = {"a": 10, "b": 90}
    r = _reload_to(client, path, flipped)
    assert r.status_code == 200 and r.json()["models"]["kept"] == ["a", "b", "c"]
    after = {u: rerank(client, "search", documents=DOCS[:2], user=u).headers["x-rerank-model"] for u in users}
    assert list(after.values()).count("b") > list(after.values()).count("a")
    table = client.app.state.pipeline.routes
    assert all(after[u] == table.decide("search", user=u).candidates[0] for u in users)
    # Nothing was loaded again: the very same schedulers serve.
    assert {m: e.scheduler for m, e in _entries(client).items()} == schedulers
    assert client.get("/v1/routes/search/report").json()["config"]["split"] == {"a": 10.0, "b": 90.0}


def test_a_reload_with_errors_is_refused_whole(gateway) -> None:
    client, path = gateway
    served = client.app.state.pipeline.served
    broken = copy.deepcopy(BASE)
    broken["routes"]["new-route"] = {"split": {"b": 1}}  # valid on its own...
    broken["routes"]["search"]["split"] = {"a": 1, "zzz": 1}  # ...but this is not
    r = _reload_to(client, path, broken)
    assert r.status_code == 400
    assert "reload refused, the running configuration is unchanged" in r.json()["message"]
    assert "routes.search: unknown model 'zzz'" in r.json()["message"]
    r = _reload_to(client, path, "models: [this is: not, valid")
    assert r.status_code == 400 and "not valid YAML" in r.json()["message"]
    r = _reload_to(client, path, yaml.safe_dump({**BASE, "modles": {}}))
    assert r.status_code == 400 and "modles" in r.json()["message"]
    assert client.app.state.pipeline.served is served
    assert rerank(client, "new-route").status_code == 404
    assert rerank(client, "search", user="someone").status_code == 200


def test_reload_under_load_fails_no_request(gateway) -> None:
    client, path = gateway
    stop = threading.Event()

    def traffic(model: str) -> list[int]:
        statuses, i = [], 0
        while not stop.is_set():
            statuses.append(rerank(client, model, documents=DOCS[: 2 + i % 5], user=f"{model}-{i}").status_code)
            i += 1
        return statuses

    versions = []
    for step in range(6):
        v = copy.deepcopy(BASE)
        v["routes"]["search"]["split"] = {"a": 10, "b": 90} if step % 2 == 0 else {"a": 90, "b": 10}
        if step in (1, 2, 5):
            v["models"]["a"]["aliases"] = ["alias-of-a"]
        v["server"] = {"max_queue_pairs": 40_000 + step}
        if step == 3:
            v["models"]["b"] = minilm(12)  # a changed model: b loads again while traffic flows to it
        versions.append(v)

    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(traffic, model) for model in ("search", "a", "b")]
        try:
            for v in versions:
                time.sleep(0.4)
                r = _reload_to(client, path, v)
                assert r.status_code == 200, r.text
        finally:
            time.sleep(0.4)
            stop.set()
        statuses = [s for w in workers for s in w.result()]
    assert len(statuses) >= 12  # at least a few requests around every reload, even on a busy machine
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert rerank(client, "alias-of-a").headers["x-rerank-model"] == "a"
    # Limits reach the schedulers that were kept, without reloading them.
    assert _entries(client)["a"].scheduler.max_queue_pairs == 40_005


def test_a_removed_model_finishes_its_requests_then_unloads(gateway) -> None:
    client, path = gateway
    old_entry = _entries(client)["c"]
    scheduler = old_entry.scheduler
    release = threading.Event()
    scheduler.fault_hook = lambda pairs, tokens: release.wait(30)  # holds c's requests in flight
    without_c = copy.deepcopy(BASE)
    del without_c["models"]["c"]
    with ThreadPoolExecutor(3) as pool:
        in_flight = [pool.submit(rerank, client, "c", documents=DOCS[: 3 + i]) for i in range(3)]
        try:
            wait_for(lambda: old_entry.active == 3, what="three requests inside model c")
            r = _reload_to(client, path, without_c)
            assert r.status_code == 200 and r.json()["models"]["removed"] == ["c"]
            assert rerank(client, "c").status_code == 404
            time.sleep(0.3)  # several drain polls pass while the requests are still running
            assert old_entry.scheduler is scheduler and old_entry.active == 3
        finally:
            release.set()
        assert [f.result().status_code for f in in_flight] == [200, 200, 200]
    wait_for(lambda: old_entry.scheduler is None, what="c to unload")
    assert old_entry.state == "off"
    # The scheduler is detached first, then closed in a worker thread (serving.reload): wait for the close.
    wait_for(lambda: not scheduler.running, what="c's scheduler to close")


def test_only_a_changed_model_loads_again(gateway) -> None:
    client, path = gateway
    old = dict(_entries(client))
    changed = copy.deepcopy(BASE)
    changed["models"]["b"]["max_length"] = 16
    changed["models"]["a"]["aliases"] = ["first"]  # an alias changes nothing that is loaded
    r = _reload_to(client, path, changed)
    assert r.json()["models"] == {"added": [], "removed": [], "reloaded": ["b"], "kept": ["a", "c"]}
    entries = _entries(client)
    assert entries["a"] is old["a"] and entries["c"] is old["c"] and entries["b"] is not old["b"]
    r = rerank(client, "b")  # waits for the new b rather than failing
    assert r.status_code == 200 and entries["b"].eff.max_length == 16
    assert rerank(client, "first").headers["x-rerank-model"] == "a"
    wait_for(lambda: old["b"].scheduler is None, what="the old b to close")


def test_reload_without_a_registry_file_is_refused() -> None:
    registry = parse_registry({"default_model": "m", "models": {"m": minilm(load="lazy")}})
    with TestClient(create_app(registry, gpu_type="cpu")) as client:
        r = client.post("/admin/reload")  # open gateway: no admin key, no tenants
        assert r.status_code == 400 and "not started from a registry file" in r.json()["message"]


# --- SIGHUP in a real `rerank-gateway serve` -----------------------------------------------------------


def test_sighup_reloads_the_running_server(tmp_path: Path) -> None:
    # A lazy model: the server is ready at once, and route reports need no model loaded.
    registry = {"default_model": "r1", "models": {"a": minilm(64, load="lazy")}, "routes": {"r1": {"split": {"a": 1}}}}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    with open(tmp_path / "server.log", "w") as log, serve_process(path, log=log, ready_timeout_s=120) as (base, proc):
        with httpx.Client(base_url=base, timeout=30) as http:
            report = lambda route: http.get(f"/v1/routes/{route}/report").status_code  # noqa: E731
            assert (report("r1"), report("r2")) == (200, 404)
            # A broken file first: the server logs the refusal and keeps serving what it had.
            path.write_text("routes: {r2: {split: {nope: 1}}}\n")
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert (report("r1"), report("r2")) == (200, 404)
            registry["routes"]["r2"] = {"split": {"a": 1}}
            path.write_text(yaml.safe_dump(registry))
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: report("r2") == 200, timeout_s=30, what="route r2 after SIGHUP")
    server_log = (tmp_path / "server.log").read_text()
    assert "reload refused, the running configuration is unchanged" in server_log
    assert "registry reloaded from" in server_log
