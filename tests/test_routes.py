"""Routes: weighted sticky splits, forced variants, fallbacks on each cause, shadow traffic and the
agreement report. Unit tests on the routing and agreement functions, then real HTTP through the app
with the real all-MiniLM-L6-v2 registered as `a` (64 tokens) and `b` (8 tokens)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.stats
from litestar.testing import TestClient

from serving.agreement import ScoreSummary, compare, count_inversions, kendall_tau_b, spearman
from gateway.app import create_app
from core.config import name_index, parse_registry
from core.errors import BadRequest, Forbidden, NotFound
from serving.routing import RouteTable, pick, stable_fraction
from tests.routes_fixtures import DOCS, metric, minilm, rerank, wait_for

# --- deciding: unit level --------------------------------------------------------------------------------


def _table(routes: dict, models: tuple[str, ...] = ("a", "b", "c")) -> RouteTable:
    reg = parse_registry(
        {
            "default_model": "a",
            "models": {m: {"backend": "embedding", "source": "unused", "aliases": [f"{m}-alias"]} for m in models},
            "routes": routes,
        }
    )
    return RouteTable(reg, name_index(reg))


@pytest.mark.parametrize("sticky", ["none", "user", "tenant"])
@pytest.mark.parametrize("weights", [{"a": 90, "b": 10}, {"a": 50, "b": 30, "c": 20}])
def test_split_proportions_over_10000_decisions(sticky: str, weights: dict[str, float]) -> None:
    table = _table({"r": {"split": weights, "sticky": sticky}})
    rng = random.Random(1234)
    counts = collections.Counter(
        table.decide("r", tenant=f"tenant-{i}", user=f"user-{i}", rand=rng.random).candidates[0] for i in range(10_000)
    )
    total = sum(weights.values())
    for model_id, weight in weights.items():
        assert abs(counts[model_id] / 10_000 - weight / total) < 0.02, (model_id, counts)


def test_sticky_user_is_stable_across_requests_and_replicas() -> None:
    routes = {"r": {"split": {"a": 50, "b": 50}, "sticky": "user"}}
    replica_1, replica_2 = _table(routes), _table(routes)
    for i in range(200):
        user = f"user-{i}"
        # A different random source on every call: a sticky decision must not consult it.
        seen = {replica.decide("r", user=user, rand=random.Random(k).random).candidates[0] for k, replica in enumerate([replica_1, replica_2] * 5)}
        assert len(seen) == 1
    # The hash is sha256(route NUL key) -> [0, 1): nothing process-local, so every replica agrees.
    digest = hashlib.sha256(b"r\x00user-7").digest()
    assert stable_fraction("r", "user-7") == int.from_bytes(digest[:8], "big") / 2**64
    assert replica_1.decide("r", user="user-7").candidates[0] == ("a" if stable_fraction("r", "user-7") < 0.5 else "b")


def test_sticky_user_without_a_user_is_random() -> None:
    table = _table({"r": {"split": {"a": 50, "b": 50}, "sticky": "user"}})
    rng = random.Random(5)
    assert {table.decide("r", user=None, rand=rng.random).candidates[0] for _ in range(50)} == {"a", "b"}


def test_sticky_tenant_ignores_the_user() -> None:
    table = _table({"r": {"split": {"a": 50, "b": 50}, "sticky": "tenant"}})
    by_tenant = {}
    for t in range(100):
        seen = {table.decide("r", tenant=f"t{t}", user=f"u{u}").candidates[0] for u in range(10)}
        assert len(seen) == 1
        by_tenant[t] = seen.pop()
    assert set(by_tenant.values()) == {"a", "b"}


def test_reordering_the_split_keys_moves_nobody() -> None:
    one = _table({"r": {"split": {"a": 70, "b": 30}, "sticky": "user"}})
    two = _table({"r": {"split": {"b": 30, "a": 70}, "sticky": "user"}})
    assert all(one.decide("r", user=f"u{i}").candidates == two.decide("r", user=f"u{i}").candidates for i in range(500))


def test_pick_walks_cumulative_weights() -> None:
    split = (("a", 1.0), ("b", 3.0))
    assert [pick(split, u) for u in (0.0, 0.2499, 0.25, 0.99999)] == ["a", "a", "b", "b"]


def test_candidates_are_the_choice_then_the_fallbacks_once_each() -> None:
    table = _table({"r": {"split": {"a": 1}, "fallback": ["b", "a-alias", "c"]}})
    assert table.decide("r").candidates == ("a", "b", "c")


def test_a_single_entry_split_is_an_alias_and_plain_models_bypass_routes() -> None:
    table = _table({"r": {"split": {"b-alias": 1}}})
    assert table.decide("r").candidates == ("b",)
    direct = table.decide("c-alias", variant="a")  # a variant header means nothing to a plain model
    assert (direct.route, direct.candidates) == (None, ("c",))
    with pytest.raises(NotFound):
        table.decide("nope")


def test_forced_variant() -> None:
    table = _table({"r": {"split": {"a": 1}, "fallback": ["b"]}, "s": {"split": {"a": 1}}})
    forced = table.decide("r", variant="b-alias")
    assert forced.candidates == ("b",) and forced.forced
    with pytest.raises(BadRequest, match="not a model of route 's'"):
        table.decide("s", variant="b")
    with pytest.raises(Forbidden):
        table.decide("r", variant="b", allowed=lambda model_id: model_id != "b")
    assert table.decide("r", variant="a", allowed=lambda model_id: model_id == "a").candidates == ("a",)


def test_shadow_sampling_follows_percent() -> None:
    table = _table({"r": {"split": {"a": 1}, "shadow": {"model": "b", "percent": 25}}})
    rng = random.Random(3)
    sampled = sum(table.decide("r", rand=rng.random).shadow == "b" for _ in range(10_000))
    assert abs(sampled / 10_000 - 0.25) < 0.02


# --- agreement: unit level, against hand-computed values --------------------------------------------------


def test_agreement_hand_computed() -> None:
    # primary ranks documents 0,1,2,3,4; the shadow swaps the first two and the middle two.
    a = compare(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([0.8, 0.9, 0.6, 0.7, 0.5]))
    assert a.top1 is False
    assert a.overlap == {1: 0.0, 3: pytest.approx(2 / 3)}  # no overlap@10 with 5 documents
    assert a.kendall_tau == pytest.approx((8 - 2) / 10)  # 8 concordant, 2 discordant pairs of 10
    assert a.spearman == pytest.approx(1 - 6 * 4 / (5 * (25 - 1)))  # rank differences 1,1,1,1,0


def test_agreement_with_ties_hand_computed() -> None:
    # y ties (0,1) and (2,3): tau-b = 4 concordant / sqrt(6 * (6 - 2)); Spearman on mean ranks 1.5, 3.5.
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 2.0, 2.0])
    assert kendall_tau_b(x, y) == pytest.approx(4 / np.sqrt(24))
    assert spearman(x, y) == pytest.approx(4 / np.sqrt(5 * 4))
    assert compare(x, x[::-1].copy()).kendall_tau == pytest.approx(-1.0)
    assert compare(x, np.ones(4)).kendall_tau is None and compare(x, np.ones(4)).spearman is None
    assert count_inversions(np.array([3.0, 1.0, 2.0, 2.0])) == 3


@pytest.mark.parametrize("n,ties", [(2, False), (7, True), (300, False), (300, True), (10_000, False)])
def test_agreement_matches_scipy(n: int, ties: bool) -> None:
    rng = np.random.default_rng(n)
    x = rng.random(n)
    y = x + rng.normal(0, 0.4, n)
    if ties:
        x, y = np.round(x, 1), np.round(y, 1)
    assert kendall_tau_b(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-9)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-9)


def test_score_summary() -> None:
    s = ScoreSummary()
    s.add(np.arange(1, 11) / 10)
    assert s.describe() == {"count": 10, "mean": pytest.approx(0.55), "p50": pytest.approx(0.55), "p90": pytest.approx(0.91)}
    big = ScoreSummary()
    values = np.random.default_rng(0).random(50_000)
    for chunk in np.split(values, 10):
        big.add(chunk)
    d = big.describe()
    assert d["count"] == 50_000 and d["mean"] == pytest.approx(values.mean())
    assert abs(d["p90"] - 0.9) < 0.02  # from the 10,000-value reservoir


# --- real HTTP ---------------------------------------------------------------------------------------------

REGISTRY = {
    "default_model": "alias",
    "models": {
        "a": minilm(64),
        "b": minilm(8),
        "c": minilm(64, load="lazy"),
        "missing": {"backend": "embedding", "source": "/nonexistent/rerank-gateway-test-model"},
    },
    "routes": {
        "alias": {"split": {"a": 1}},
        "ab-user": {"split": {"a": 50, "b": 50}, "sticky": "user"},
        "ab-tenant": {"split": {"a": 50, "b": 50}, "sticky": "tenant"},
        "ninety-ten": {"split": {"a": 90, "b": 10}, "sticky": "user"},
        "via-missing": {"split": {"missing": 1}, "fallback": ["a"]},
        "via-lazy": {"split": {"c": 1}, "fallback": ["a"]},
        "a-then-b": {"split": {"a": 1}, "fallback": ["b"]},
        "shadowed": {"split": {"a": 1}, "shadow": {"model": "b", "percent": 100}},
        "shadow-check": {"split": {"a": 1}, "shadow": {"model": "b"}},
        "shadow-drop": {"split": {"a": 1}, "shadow": {"model": "b"}},
    },
}


@pytest.fixture(scope="module")
def client():
    app = create_app(parse_registry(REGISTRY), gpu_type="cpu", wait_for_models=True)
    with TestClient(app, timeout=60) as c:
        yield c


def _scheduler(client: TestClient, model_id: str):
    return client.app.state.pipeline.pool.entries[model_id].scheduler


@contextlib.contextmanager
def _fault(client: TestClient, model_id: str, hook):
    sched = _scheduler(client, model_id)
    sched.fault_hook = hook
    try:
        yield sched
    finally:
        sched.fault_hook = None


def _drain_shadows(client: TestClient) -> None:
    client.blocking_portal.call(client.app.state.pipeline.shadows.drain)


def _report(client: TestClient, route: str) -> dict:
    r = client.get(f"/v1/routes/{route}/report")
    assert r.status_code == 200, r.text
    return r.json()


def test_every_response_names_its_route_and_model(client: TestClient) -> None:
    for model, route, answered in [(None, "alias", "a"), ("alias", "alias", "a"), ("b", "b", "b"), ("a", "a", "a")]:
        r = rerank(client, model, top_n=2)
        assert r.status_code == 200, r.text
        assert (r.headers["x-rerank-route"], r.headers["x-rerank-model"]) == (route, answered)
        assert r.json()["model"] == answered and len(r.json()["results"]) == 2
    r = rerank(client, "no-such-route")
    assert r.status_code == 404 and "no-such-route" in r.json()["message"]


def test_sticky_per_user_over_http(client: TestClient) -> None:
    seen = {}
    for i in range(12):
        user = f"user-{i}"
        expected = "a" if stable_fraction("ab-user", user) < 0.5 else "b"
        models = {rerank(client, "ab-user", documents=DOCS[:3], user=user).headers["x-rerank-model"] for _ in range(3)}
        # The X-User-Id header is the same key as the body's `user` field.
        models.add(rerank(client, "ab-user", documents=DOCS[:3], headers={"X-User-Id": user}).headers["x-rerank-model"])
        assert models == {expected}
        seen[user] = expected
    assert set(seen.values()) == {"a", "b"}


def test_sticky_per_tenant_over_http(client: TestClient) -> None:
    # An open gateway has one tenant (""): a tenant-sticky route sends all of it to one variant.
    expected = "a" if stable_fraction("ab-tenant", "") < 0.5 else "b"
    models = {rerank(client, "ab-tenant", documents=DOCS[:3], user=f"u{i}").headers["x-rerank-model"] for i in range(8)}
    assert models == {expected}


def test_split_over_http_matches_the_routing_function(client: TestClient) -> None:
    table = client.app.state.pipeline.routes
    counts = collections.Counter()
    for i in range(40):
        r = rerank(client, "ninety-ten", documents=DOCS[:2], user=f"visitor-{i}")
        assert r.status_code == 200
        assert r.headers["x-rerank-model"] == table.decide("ninety-ten", user=f"visitor-{i}").candidates[0]
        counts[r.headers["x-rerank-model"]] += 1
    assert counts["a"] > counts["b"] > 0
    assert _report(client, "ninety-ten")["traffic"]["answered"] == dict(sorted(counts.items()))


def test_forced_variant_over_http(client: TestClient) -> None:
    user = next(f"u{i}" for i in range(100) if stable_fraction("ab-user", f"u{i}") < 0.5)  # sticks to a
    assert rerank(client, "ab-user", user=user).headers["x-rerank-model"] == "a"
    r = rerank(client, "ab-user", user=user, headers={"X-Rerank-Variant": "b"})
    assert r.status_code == 200 and r.headers["x-rerank-model"] == "b"
    r = rerank(client, "ab-user", headers={"X-Rerank-Variant": "c"})
    assert r.status_code == 400 and "not a model of route 'ab-user'" in r.json()["message"]


def test_fallback_when_the_model_failed_to_load(client: TestClient) -> None:
    states = {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}
    assert states["missing"] == "unavailable"
    r = rerank(client, "via-missing")
    assert r.status_code == 200
    assert r.headers["x-rerank-model"] == "a" and r.headers["x-rerank-fallback"] == "missing=unavailable"
    assert _report(client, "via-missing")["traffic"]["fallbacks"] == {"missing": {"unavailable": 1}}
    assert metric(client, "rerank_route_fallbacks_total", route="via-missing", model="missing", cause="unavailable") == 1


def test_fallback_while_the_model_is_loading(client: TestClient) -> None:
    entries = client.app.state.pipeline.pool.entries
    assert entries["c"].state == "not_loaded"  # lazy: the first request starts the load and falls back
    r = rerank(client, "via-lazy")
    assert r.status_code == 200
    assert r.headers["x-rerank-model"] == "a" and r.headers["x-rerank-fallback"] == "c=loading"
    wait_for(lambda: entries["c"].state == "ready", what="model c to load")
    r = rerank(client, "via-lazy")
    assert r.headers["x-rerank-model"] == "c" and "x-rerank-fallback" not in r.headers


def test_fallback_when_the_model_is_overloaded(client: TestClient) -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)

    def block(pairs: int, tokens: int) -> None:
        entered.release()
        release.wait(30)

    sched = _scheduler(client, "a")
    limit = sched.max_queue_pairs
    with ThreadPoolExecutor(sched.streams + 1) as pool, _fault(client, "a", block):
        sched.max_queue_pairs = 4
        try:
            # Hold every inference stream of `a` in a forward pass, then queue one more request.
            # One at a time: two requests arriving together are over a 4-pair queue limit before either
            # is tokenized (admission counts requests being tokenized).
            in_forward = []
            for _ in range(sched.streams):
                in_forward.append(pool.submit(rerank, client, "a"))
                assert entered.acquire(timeout=30)
            queued = pool.submit(rerank, client, "a")
            wait_for(lambda: sched.queue_depth()[0] > 0, what="a queued request")
            r = rerank(client, "a-then-b")
            assert r.status_code == 200, r.text
            assert r.headers["x-rerank-model"] == "b" and r.headers["x-rerank-fallback"] == "a=overloaded"
            # Asked for directly, the same model answers 429: the route is what turned it into a fallback.
            direct = rerank(client, "a")
            assert direct.status_code == 429 and "retry-after" in direct.headers
        finally:
            release.set()
            sched.max_queue_pairs = limit
        assert all(f.result().status_code == 200 for f in in_forward) and queued.result().status_code == 200


def test_fallback_when_the_model_fails(client: TestClient) -> None:
    def fail(pairs: int, tokens: int) -> None:
        raise RuntimeError("injected device failure")

    with _fault(client, "a", fail):
        r = rerank(client, "a-then-b")
        assert r.status_code == 200
        assert r.headers["x-rerank-model"] == "b" and r.headers["x-rerank-fallback"] == "a=failed"
        # No fallback configured, or a forced variant: the failure reaches the caller, still labelled.
        r = rerank(client, "alias")
        assert r.status_code == 503 and "injected device failure" in r.json()["message"]
        assert r.headers["x-rerank-route"] == "alias"
        r = rerank(client, "a-then-b", headers={"X-Rerank-Variant": "a"})
        assert r.status_code == 503
    assert rerank(client, "a-then-b").headers["x-rerank-model"] == "a"


@pytest.mark.serial  # latency beside a held shadow against latency alone, in wall time
def test_shadow_never_delays_the_primary(client: TestClient) -> None:
    baseline = []
    for _ in range(5):
        start = time.perf_counter()
        assert rerank(client, "alias").status_code == 200
        baseline.append(time.perf_counter() - start)
    held, release = threading.Event(), threading.Event()

    def slow_shadow(pairs: int, tokens: int) -> None:
        held.set()
        release.wait(1.5)  # every shadow batch, on every stream, is held while the primaries answer

    with _fault(client, "b", slow_shadow):
        latencies = []
        for _ in range(5):
            start = time.perf_counter()
            r = rerank(client, "shadowed", top_n=3)
            latencies.append(time.perf_counter() - start)
            assert r.status_code == 200 and r.headers["x-rerank-model"] == "a" and len(r.json()["results"]) == 3
        # Every answer came back while the shadow was still held in its forward pass.
        assert _report(client, "shadowed")["shadow"]["requests"].get("compared", 0) == 0
        release.set()
        _drain_shadows(client)
    assert _report(client, "shadowed")["shadow"]["requests"] == {"compared": 5}
    assert held.is_set() and max(latencies) < 1.0, latencies
    assert statistics.median(latencies) < statistics.median(baseline) + 0.3, (latencies, baseline)


def _kendall_by_pairs(x: list[float], y: list[float]) -> float:
    """The textbook definition, pair by pair (no ties in these scores)."""
    n = len(x)
    s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i in range(n) for j in range(i + 1, n))
    return s / (n * (n - 1) / 2)


def test_shadow_agreement_matches_hand_computed_values(client: TestClient) -> None:
    full = {}
    for model in ("a", "b"):
        results = rerank(client, model).json()["results"]
        full[model] = {r["index"]: r["relevance_score"] for r in results}
    a_order = sorted(full["a"], key=lambda i: -full["a"][i])
    b_order = sorted(full["b"], key=lambda i: -full["b"][i])
    assert a_order != b_order  # the 8-token variant really ranks differently

    r = rerank(client, "shadow-check", top_n=3)
    # The caller still gets its top 3, cut from the full ranking the shadow comparison needed.
    assert [x["index"] for x in r.json()["results"]] == a_order[:3]
    _drain_shadows(client)
    report = _report(client, "shadow-check")
    assert report["config"]["shadow"] == {"model": "b", "percent": 100.0}
    [pair] = report["shadow"]["agreement"]
    assert (pair["primary"], pair["shadow"], pair["compared"]) == ("a", "b", 1)

    x = [full["a"][i] for i in range(len(DOCS))]
    y = [full["b"][i] for i in range(len(DOCS))]
    assert pair["top1_agreement"] == float(a_order[0] == b_order[0])
    for k in (1, 3, 10):
        assert pair["overlap_at_k"][str(k)] == pytest.approx(len(set(a_order[:k]) & set(b_order[:k])) / k)
    assert pair["kendall_tau"] == pytest.approx(_kendall_by_pairs(x, y), abs=1e-6)
    assert pair["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-6)
    for role, model, values in (("primary", "a", x), ("shadow", "b", y)):
        summary = report["shadow"]["scores"][role][model]
        assert summary["count"] == len(DOCS)
        assert summary["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert summary["p50"] == pytest.approx(np.percentile(values, 50), abs=1e-6)
        assert summary["p90"] == pytest.approx(np.percentile(values, 90), abs=1e-6)

    labels = {"route": "shadow-check", "primary": "a", "shadow": "b"}
    assert metric(client, "rerank_shadow_comparisons_total", **labels) == 1
    assert metric(client, "rerank_shadow_top1_agreements_total", **labels) == (1 if pair["top1_agreement"] else None)
    assert metric(client, "rerank_shadow_kendall_tau_count", **labels) == 1
    assert metric(client, "rerank_shadow_agreement", stat="kendall_tau", **labels) == pytest.approx(pair["kendall_tau"])
    assert metric(client, "rerank_shadow_agreement", stat="spearman", **labels) == pytest.approx(pair["spearman"])
    assert metric(client, "rerank_shadow_agreement", stat="overlap_at_10", **labels) == pytest.approx(pair["overlap_at_k"]["10"])
    assert metric(client, "rerank_shadow_overlap_sum", k="3", **labels) == pytest.approx(pair["overlap_at_k"]["3"])
    assert metric(client, "rerank_shadow_score", route="shadow-check", model="b", role="shadow", stat="p90") == pytest.approx(
        report["shadow"]["scores"]["shadow"]["b"]["p90"]
    )
    # The shadow ran as its own tenant, visible in the per-tenant request counter.
    assert metric(client, "rerank_requests_total", model="b", tenant="__shadow__", status="200") >= 1


def test_shadow_is_dropped_first_under_load(client: TestClient) -> None:
    release = threading.Event()
    with _fault(client, "b", lambda pairs, tokens: release.wait(30)):
        try:
            for _ in range(12):
                r = rerank(client, "shadow-drop")
                assert r.status_code == 200 and r.headers["x-rerank-model"] == "a"
                time.sleep(0.15)  # lets each shadow reach b's queue before the next is decided
            requests = _report(client, "shadow-drop")["shadow"]["requests"]
            assert requests.get("dropped_busy", 0) >= 1, requests
        finally:
            release.set()
        _drain_shadows(client)
    requests = _report(client, "shadow-drop")["shadow"]["requests"]
    assert requests["compared"] + requests["dropped_busy"] == 12, requests
    assert metric(client, "rerank_shadow_requests_total", route="shadow-drop", shadow="b", outcome="dropped_busy") == requests["dropped_busy"]


def test_report_of_an_unknown_route_is_404(client: TestClient) -> None:
    r = client.get("/v1/routes/nope/report")
    assert r.status_code == 404 and "nope" in r.json()["message"]
