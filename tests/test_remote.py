"""`backend: remote` against real `rerank-gateway serve` processes as the upstreams, each served dialect
also spoken as an upstream: same ranking as calling the model directly, a 250-document request split
and merged, a real upstream 429 retried after its Retry-After, one of two endpoints killed (and brought
back) under load with zero failed requests, both killed -> the route's fallback, a client disconnect
cancelling the upstream call, a missing key or an unreachable pool -> unavailable with the reason, and a
remote primary with a local shadow producing the agreement report.

The front door is the app under uvicorn in this process (tests.conftest.LiveServer), so a test can read
its metrics; the upstreams are separate processes, started together once for the module."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core.config import RegistryError, parse_registry
from core.errors import ModelUnavailable
from tenancy.auth import key_sha256
from pool.upstream_endpoints import EndpointPool
from observability.metrics import Metrics
from tests.conftest import LiveServer, free_port, serve_process
from tests.load import Load
from tests.routes_fixtures import DOCS, QUERY, metric, minilm, wait_for

FRONT_KEY = "k-front-0123456789"  # the front door's key at the keyed upstream
LIMITED_KEY = "k-limited-0123456789"  # one request per 3-second window there
DIRECT_KEY = "k-direct-0123456789"  # a tenant of `a` that is not a front door
AUTH = {"authorization": f"Bearer {FRONT_KEY}"}
ENV = {"RERANK_TEST_FRONT_KEY": FRONT_KEY, "RERANK_TEST_LIMITED_KEY": LIMITED_KEY}
DIALECT_PATHS = {"cohere": "", "jina": "", "vllm": "", "voyage": "/voyage/v1", "tei": "", "gateway": ""}


def _registry_file(directory: Path, name: str, **top: Any) -> Path:
    path = directory / f"{name}.yaml"
    data = {"default_model": "minilm", "models": {"minilm": minilm(cpu_streams=1)}, "usage": {"path": None}, **top}
    path.write_text(yaml.safe_dump(data))
    return path


class Upstream:
    """A serve process that a test may kill and start again on the same port."""

    def __init__(self, path: Path) -> None:
        self.path, self.port = path, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stack: contextlib.ExitStack | None = None
        self.proc = None

    def start(self) -> "Upstream":
        self._stack = contextlib.ExitStack()
        _, self.proc = self._stack.enter_context(serve_process(self.path, port=self.port))
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    d = tmp_path_factory.mktemp("upstreams")
    plain = _registry_file(d, "plain")
    # `a` wants keys: the front door's (no limits) and a rate-limited one for the 429 test.
    keyed = _registry_file(
        d,
        "keyed",
        tenants={
            "front": {"api_key_sha256": key_sha256(FRONT_KEY), "forwards_tenants": True},
            "direct": {"api_key_sha256": key_sha256(DIRECT_KEY)},
            "limited": {"api_key_sha256": key_sha256(LIMITED_KEY), "requests_per_minute": 1},
        },
        limits={"rate_window_s": 3},
    )
    ups = {"a": Upstream(keyed), "k1": Upstream(plain), "k2": Upstream(plain)}
    # Started together: the model loads overlap instead of queueing.
    with ThreadPoolExecutor(len(ups)) as pool:
        list(pool.map(Upstream.start, ups.values()))
    try:
        yield ups
    finally:
        for up in ups.values():
            up.stop()


class Misbehaving:
    """Loopback upstreams that fail in the ways real ones do: one accepts connections and never answers
    (a stalled server), one answers 200 with a body that is not the dialect's."""

    def __init__(self) -> None:
        import http.server
        import socket

        self._stall = socket.socket()
        self._stall.bind(("127.0.0.1", 0))
        self._stall.listen(64)
        self.stall_url = f"http://127.0.0.1:{self._stall.getsockname()[1]}"
        self._held: list = []

        def hold() -> None:
            while True:
                try:
                    conn, _ = self._stall.accept()
                except OSError:
                    return
                self._held.append(conn)  # read nothing, answer nothing

        class Garbage(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = b'{"results": [{"index": 99, "relevance_score": "high"}]}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self._garbage = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
        self.garbage_url = f"http://127.0.0.1:{self._garbage.server_address[1]}"
        for target in (hold, self._garbage.serve_forever):
            threading.Thread(target=target, daemon=True).start()

    def close(self) -> None:
        self._garbage.shutdown()
        self._stall.close()
        for conn in self._held:
            conn.close()


@pytest.fixture(scope="module")
def misbehaving():
    servers = Misbehaving()
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def front(upstreams, misbehaving):
    a = upstreams["a"].url
    models: dict[str, Any] = {"local": minilm(cpu_streams=1)}
    for dialect, suffix in DIALECT_PATHS.items():
        models[f"via-{dialect}"] = {
            "backend": "remote", "dialect": dialect, "upstream_model": "minilm", "endpoints": [a + suffix],
            "api_key_env": "RERANK_TEST_FRONT_KEY",
        }
    models["via-tei"]["max_documents_per_call"] = 5  # TEI's own 32, lowered so the 12 test documents split too
    models["via-gateway"]["max_documents_per_call"] = 1000
    # The split and merge of a big request, at a size every machine scores quickly: 250 = 100 + 100 + 50.
    models["split-calls"] = {**models["via-gateway"], "max_documents_per_call": 100}
    models["limited"] = {
        "backend": "remote", "dialect": "gateway", "upstream_model": "minilm", "endpoints": [a],
        "api_key_env": "RERANK_TEST_LIMITED_KEY", "timeout_s": 10,
    }
    models["pool"] = {
        "backend": "remote", "dialect": "gateway", "upstream_model": "minilm",
        "endpoints": [upstreams["k1"].url, upstreams["k2"].url], "timeout_s": 10,
    }
    models["stall-or-a"] = {
        "backend": "remote", "dialect": "gateway", "upstream_model": "minilm", "endpoints": [misbehaving.stall_url, a],
        "api_key_env": "RERANK_TEST_FRONT_KEY", "timeout_s": 1,
    }
    models["garbage"] = {"backend": "remote", "dialect": "cohere", "endpoints": [misbehaving.garbage_url]}
    models["no-key"] = {"backend": "remote", "dialect": "cohere", "endpoints": [a], "api_key_env": "RERANK_TEST_UNSET_KEY"}
    models["unreachable"] = {"backend": "remote", "dialect": "cohere", "endpoints": [f"http://127.0.0.1:{free_port()}"]}
    registry = parse_registry(
        {
            "default_model": "local",
            "models": models,
            "routes": {
                "migrate": {"split": {"via-cohere": 100}, "shadow": {"model": "local", "percent": 100}},
                "pooled": {"split": {"pool": 100}, "fallback": ["local"]},
                # After the flip: local primary, the remote one as fallback and as a shadow.
                "flipped": {"split": {"local": 100}, "fallback": ["via-cohere"], "shadow": {"model": "via-gateway", "percent": 100}},
            },
            "server": {"request_timeout_s": 20},
            "usage": {"path": None},
        }
    )
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    os.environ.pop("RERANK_TEST_UNSET_KEY", None)
    try:
        with LiveServer(registry) as server:
            yield server
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _ranking(response: httpx.Response) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    return [(r["index"], r["relevance_score"]) for r in response.json()["results"]]


# --- each dialect as an upstream ---------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", list(DIALECT_PATHS))
def test_each_dialect_as_upstream_ranks_as_the_model_does(upstreams, front, dialect):
    direct = httpx.post(f"{upstreams['a'].url}/v1/rerank", json={"query": QUERY, "documents": DOCS}, headers=AUTH, timeout=30)
    via = httpx.post(f"{front.url}/v2/rerank", json={"model": f"via-{dialect}", "query": QUERY, "documents": DOCS}, timeout=30)
    assert [i for i, _ in _ranking(via)] == [i for i, _ in _ranking(direct)]
    assert [s for _, s in _ranking(via)] == pytest.approx([s for _, s in _ranking(direct)], abs=1e-5)
    # Usage as for a local model: the upstream's token count (TEI's in x-compute-tokens), search units.
    # via-tei splits the 12 documents in 3 calls, and this model counts the query's tokens in each.
    tokens, direct_tokens = via.json()["usage"]["total_tokens"], direct.json()["usage"]["total_tokens"]
    assert tokens > direct_tokens if dialect == "tei" else tokens == direct_tokens
    assert via.json()["meta"]["billed_units"]["search_units"] == 1
    top = httpx.post(f"{front.url}/v2/rerank", json={"model": f"via-{dialect}", "query": QUERY, "documents": DOCS, "top_n": 3}, timeout=30)
    # The same top 3; scores equal up to float32 rounding: via-tei's three concurrent calls share the
    # upstream's batches differently from one request to the next (it failed 1 run in 4 on exact floats).
    assert [i for i, _ in _ranking(top)] == [i for i, _ in _ranking(via)[:3]]
    assert [s for _, s in _ranking(top)] == pytest.approx([s for _, s in _ranking(via)[:3]], abs=1e-6)


def test_split_250_documents_and_merge(upstreams, front):
    docs = [f"document {i} about {'the eiffel tower in paris' if i % 61 == 0 else 'something else entirely'} number {i}" for i in range(250)]
    f = httpx.Client(base_url=front.url)
    calls = lambda: metric(f, "rerank_upstream_requests_total", model="split-calls", outcome="ok") or 0.0
    before = calls()
    via = httpx.post(f"{front.url}/v2/rerank", json={"model": "split-calls", "query": QUERY, "documents": docs, "top_n": 10}, timeout=60)
    direct = httpx.post(f"{upstreams['a'].url}/v2/rerank", json={"model": "minilm", "query": QUERY, "documents": docs, "top_n": 10}, headers=AUTH, timeout=60)
    assert [i for i, _ in _ranking(via)] == [i for i, _ in _ranking(direct)]
    assert calls() - before == 3  # 100 + 100 + 50, each asked for its top 10, merged, cut to 10
    assert via.json()["meta"]["billed_units"]["search_units"] == 3


def test_a_key_from_the_environment_reaches_the_upstream_and_nowhere_else(upstreams, front):
    # `a` refuses callers without a key; the front door's via-* models carry RERANK_TEST_FRONT_KEY.
    assert httpx.post(f"{upstreams['a'].url}/v2/rerank", json={"model": "minilm", "query": QUERY, "documents": DOCS}).status_code == 401
    assert _ranking(httpx.post(f"{front.url}/v2/rerank", json={"model": "via-gateway", "query": QUERY, "documents": DOCS}, timeout=30))
    for path in ("/v1/models", "/metrics", "/ready"):
        text = httpx.get(front.url + path).text
        assert FRONT_KEY not in text and LIMITED_KEY not in text


def test_upstream_429_is_retried_after_its_retry_after(upstreams, front):
    keyed = f"{upstreams['a'].url}/v2/rerank"
    body = {"model": "minilm", "query": QUERY, "documents": DOCS[:3]}
    client = httpx.Client(base_url=front.url)
    rate_limited = lambda: metric(client, "rerank_upstream_requests_total", model="limited", outcome="http_429") or 0.0
    for _ in range(3):  # again only if the upstream's 3-second window ended between the two calls below
        # Spend the limited tenant's one request of this window, directly, until the upstream says 429.
        for _ in range(5):
            direct = httpx.post(keyed, json=body, headers={"authorization": f"Bearer {LIMITED_KEY}"})
            if direct.status_code == 429:
                break
        assert direct.status_code == 429
        retry_after = int(direct.headers["retry-after"])
        before = rate_limited()
        started = time.monotonic()
        via = httpx.post(f"{front.url}/v2/rerank", json={**body, "model": "limited"}, timeout=30)
        elapsed = time.monotonic() - started
        assert via.status_code == 200, via.text
        if rate_limited() > before:
            break
    assert rate_limited() > before
    # Not called again before the window the upstream named was over.
    assert elapsed >= retry_after - 1.0


def test_client_disconnect_cancels_the_upstream_call(upstreams, front):
    a = httpx.Client(base_url=upstreams["a"].url)  # /metrics needs no key
    cancelled = lambda: metric(a, "rerank_requests_total", model="minilm", status="499") or 0.0
    before = cancelled()
    docs = [f"{DOCS[i % len(DOCS)]} {' '.join(['more words'] * 20)} {i}" for i in range(3000)]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{front.url}/v2/rerank", json={"model": "via-gateway", "query": QUERY, "documents": docs}, timeout=1.0)
    # The front door saw the disconnect, cancelled its calls, and the upstream dropped them as 499s.
    wait_for(lambda: cancelled() > before, timeout_s=20, what="the upstream to see the call cancelled")
    f = httpx.Client(base_url=front.url)
    wait_for(lambda: (metric(f, "rerank_requests_total", model="via-gateway", status="499") or 0.0) >= 1, timeout_s=10, what="499 at the front")


# --- an endpoint pool under faults -------------------------------------------------------------------------


def test_one_endpoint_killed_and_restarted_under_load_fails_nothing(upstreams, front):
    k1 = upstreams["k1"]
    f = httpx.Client(base_url=front.url)
    ok_on = lambda up: metric(f, "rerank_upstream_requests_total", model="pool", endpoint=up.url, outcome="ok") or 0.0
    with Load(front.url, {"model": "pooled", "query": QUERY, "documents": DOCS}) as load:
        wait_for(lambda: ok_on(k1) > 0 and ok_on(upstreams["k2"]) > 0, timeout_s=20, what="traffic on both endpoints")
        k1.kill()
        wait_for(lambda: (metric(f, "rerank_upstream_ejections_total", model="pool", endpoint=k1.url) or 0) >= 1, timeout_s=10, what="k1 ejected")
        served_while_down = len(load.results)
        k1.stop()
        k1.start()  # same port: the pool probes it back after its cool-down
        back = ok_on(k1)
        # Probes while it starts fail and double its cool-down (1, 2, 4 ... s): allow for a slow start.
        wait_for(lambda: ok_on(k1) > back, timeout_s=60, what="k1 probed back into the pool")
    assert not load.failed(), load.failed()[:5]
    assert len(load.results) > served_while_down > 0
    assert all(h.get("x-rerank-model") == "pool" and h.get("x-rerank-fallback") is None for _, h in load.results)
    assert metric(f, "rerank_upstream_up", model="pool", endpoint=k1.url) == 1


def test_both_endpoints_killed_the_route_falls_back(upstreams, front):
    k1, k2 = upstreams["k1"], upstreams["k2"]
    f = httpx.Client(base_url=front.url)
    ejections = lambda up: metric(f, "rerank_upstream_ejections_total", model="pool", endpoint=up.url) or 0.0
    before = {up: ejections(up) for up in (k1, k2)}
    k1.kill()
    k2.kill()
    for _ in range(3):
        r = httpx.post(f"{front.url}/v2/rerank", json={"model": "pooled", "query": QUERY, "documents": DOCS}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["x-rerank-model"] == "local" and r.headers["x-rerank-fallback"] == "pool=unavailable"
    # Both ejected, as the pool's own state says (not a guess at how long that took).
    wait_for(lambda: all(ejections(up) > before[up] for up in (k1, k2)), timeout_s=10, what="both endpoints ejected")

    def direct_call_names_both_endpoints() -> None:
        direct = httpx.post(f"{front.url}/v2/rerank", json={"model": "pool", "query": QUERY, "documents": DOCS}, timeout=30)
        message = direct.json()["message"]
        assert direct.status_code == 503 and "every upstream endpoint is ejected" in message, message
        assert k1.url in message and k2.url in message and "ConnectError" in message, message

    direct_call_names_both_endpoints()
    # The same answer once their cool-downs are over (1 s, which a slow machine spends on the calls above):
    # the call probes both, both refuse, and it says so in the same words (issue 20: it answered
    # "upstream ... unreachable" instead, depending on how fast the machine was).
    endpoints = lambda: next(m for m in httpx.get(f"{front.url}/v1/models").json()["data"] if m["id"] == "pool")["upstream"]["endpoints"]
    wait_for(lambda: not any("ejected_for_s" in e for e in endpoints()), timeout_s=15, what="the cool-downs to pass")
    direct_call_names_both_endpoints()
    assert all(ejections(up) >= before[up] + 2 for up in (k1, k2))  # probed again, and ejected again


def test_a_stalled_endpoint_times_out_and_the_other_answers(front, misbehaving):
    f = httpx.Client(base_url=front.url)
    stalled = lambda outcome: metric(f, "rerank_upstream_requests_total", model="stall-or-a", endpoint=misbehaving.stall_url, outcome=outcome) or 0.0
    # The load-time probe already found it silent and ejected it for a second; once that is over, calls
    # probe it again, time out after timeout_s (1 s) and go to the other endpoint.
    deadline = time.monotonic() + 20
    while stalled("timeout") < 1 and time.monotonic() < deadline:
        r = httpx.post(f"{front.url}/v2/rerank", json={"model": "stall-or-a", "query": QUERY, "documents": DOCS}, timeout=30)
        assert r.status_code == 200, r.text
        time.sleep(0.3)
    assert stalled("timeout") >= 1
    assert (metric(f, "rerank_upstream_ejections_total", model="stall-or-a", endpoint=misbehaving.stall_url) or 0) >= 2
    assert (metric(f, "rerank_upstream_requests_total", model="stall-or-a", outcome="ok") or 0) >= 1


def test_a_malformed_upstream_answer_is_a_503_never_a_wrong_ranking(front, misbehaving):
    r = httpx.post(f"{front.url}/v2/rerank", json={"model": "garbage", "query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 503 and "malformed" in r.json()["message"]
    f = httpx.Client(base_url=front.url)
    assert (metric(f, "rerank_upstream_requests_total", model="garbage", outcome="bad_response") or 0) >= 1


# --- unavailable with a reason, routes and shadows ----------------------------------------------------------


def test_missing_key_or_unreachable_pool_is_unavailable_with_the_reason(front):
    models = {m["id"]: m for m in httpx.get(f"{front.url}/v1/models").json()["data"]}
    assert models["no-key"]["state"] == "unavailable"
    assert "RERANK_TEST_UNSET_KEY" in models["no-key"]["reason"]
    assert models["unreachable"]["state"] == "unavailable" and "no upstream endpoint reachable" in models["unreachable"]["reason"]
    assert models["via-cohere"]["state"] == "ready" and models["via-cohere"]["upstream"]["dialect"] == "cohere"
    # Through /v1/models' typed schema: the upstream's endpoints, and no local device, precision or budget.
    assert {e["state"] for e in models["via-cohere"]["upstream"]["endpoints"]} <= {"up", "probing", "ejected"}
    assert not {"device", "dtype", "max_batch_tokens", "budget_reason"} & set(models["via-cohere"])
    r = httpx.post(f"{front.url}/v2/rerank", json={"model": "no-key", "query": QUERY, "documents": DOCS})
    assert r.status_code == 503 and "RERANK_TEST_UNSET_KEY" in r.json()["message"]


def test_remote_primary_with_local_shadow_gives_the_agreement_report(upstreams, front):
    for _ in range(3):
        r = httpx.post(f"{front.url}/v2/rerank", json={"model": "migrate", "query": QUERY, "documents": DOCS, "top_n": 3}, timeout=30)
        assert r.status_code == 200 and r.headers["x-rerank-model"] == "via-cohere" and len(r.json()["results"]) == 3
    report = lambda: httpx.get(f"{front.url}/v1/routes/migrate/report").json()
    wait_for(lambda: report()["shadow"]["requests"].get("compared", 0) >= 3, timeout_s=20, what="3 shadow comparisons")
    (pair,) = report()["shadow"]["agreement"]
    assert pair["primary"] == "via-cohere" and pair["shadow"] == "local" and pair["compared"] >= 3
    # The same weights on both sides: the hosted stand-in and the local model agree completely.
    assert pair["top1_agreement"] == 1.0 and pair["kendall_tau"] == pytest.approx(1.0)
    # And the other way round, once the local model answers: a remote shadow is compared the same way.
    r = httpx.post(f"{front.url}/v2/rerank", json={"model": "flipped", "query": QUERY, "documents": DOCS}, timeout=30)
    assert r.status_code == 200 and r.headers["x-rerank-model"] == "local"
    flipped = lambda: httpx.get(f"{front.url}/v1/routes/flipped/report").json()
    wait_for(lambda: flipped()["shadow"]["requests"].get("compared", 0) >= 1, timeout_s=20, what="a remote shadow comparison")
    assert flipped()["shadow"]["agreement"][0]["shadow"] == "via-gateway"
    # The shadow ran as the front door's shadow tenant, and `a` (which trusts this front door to say so)
    # queued it as that tenant, at the shadow's tiny weight, not as the front door's own traffic.
    a = httpx.Client(base_url=upstreams["a"].url)
    assert (metric(a, "rerank_requests_total", model="minilm", status="200", tenant="front/__shadow__") or 0) >= 1


def test_only_a_front_door_may_name_the_tenant(upstreams):
    a = httpx.Client(base_url=upstreams["a"].url)
    r = a.post(
        "/v2/rerank", json={"model": "minilm", "query": QUERY, "documents": DOCS[:2]},
        headers={"authorization": f"Bearer {DIRECT_KEY}", "x-rerank-tenant": "someone-else", "x-rerank-tenant-weight": "1000"},
    )
    assert r.status_code == 200
    assert metric(a, "rerank_requests_total", tenant="direct/someone-else") is None
    assert (metric(a, "rerank_requests_total", model="minilm", tenant="direct") or 0) >= 1


# --- the registry and the pool, without servers -------------------------------------------------------------


@pytest.mark.parametrize(
    "model, says",
    [
        ({"backend": "remote", "endpoints": ["http://x"]}, "dialect: required"),
        ({"backend": "remote", "dialect": "cohere"}, "endpoints: required by backend: remote"),
        ({"backend": "remote", "dialect": "cohere", "endpoints": []}, "endpoints: needs at least one"),
        ({"backend": "remote", "dialect": "cohere", "endpoints": ["https://x"], "source": "x"}, "source: only for a local backend"),
        ({"backend": "remote", "dialect": "cohere", "endpoints": ["ftp://x"]}, "endpoints[0]"),
        ({"backend": "remote", "dialect": "cohere", "endpoints": ["https://user:pw@x"]}, "without credentials"),
        ({"backend": "remote", "dialect": "cohere", "endpoints": ["https://x"], "api_key_env": "sk-live 123"}, "api_key_env"),
        ({"backend": "remote", "dialect": "soap", "endpoints": ["https://x"]}, "dialect"),
        ({"backend": "remote", "dialect": "cohere", "endpoints": ["https://x"], "max_documents_per_call": 0}, "max_documents_per_call"),
        ({"backend": "embedding", "source": "x", "endpoints": ["https://x"]}, "only for backend: remote"),
        ({"backend": "embedding"}, "source: required"),
    ],
)
def test_registry_refuses_bad_remote_models(model, says):
    with pytest.raises(RegistryError, match=rf".*{__import__('re').escape(says)}"):
        parse_registry({"default_model": "m", "models": {"m": model}})


def test_pool_balances_by_outstanding_requests_and_ejects():
    async def run() -> None:
        pool = EndpointPool("m", ["http://a", "http://b"], max_concurrency=2, metrics=Metrics())
        a, b = pool.endpoints
        deadline = time.monotonic() + 5
        first = await pool.acquire(set(), deadline)
        second = await pool.acquire(set(), deadline)
        assert {first, second} == {a, b}  # the idle one, not the same one twice
        third = await pool.acquire(set(), deadline)
        fourth = await pool.acquire(set(), deadline)
        assert {third, fourth} == {a, b}  # one more each, not two on one
        # Both at max_concurrency: the next call waits until one frees, and takes that one.
        fifth = asyncio.ensure_future(pool.acquire(set(), deadline))
        await asyncio.sleep(0.05)
        assert not fifth.done()
        pool.release(third)
        assert (await fifth) is third
        for e in (first, second, fourth, third):
            pool.release(e)
        pool.faulted(a, "ConnectError", refused=True)
        assert [await _take(pool, deadline) for _ in range(4)] == [b] * 4
        pool.faulted(b, "HTTP 500")
        pool.faulted(b, "HTTP 500")
        pool.faulted(b, "HTTP 500")
        with pytest.raises(ModelUnavailable, match="every upstream endpoint is ejected"):
            await pool.acquire(set(), deadline)
        a.ejected_until = time.monotonic()  # cool-down over: one probe goes through, the next waits for it
        probe = await pool.acquire(set(), deadline)
        assert probe is a and a.probing
        with pytest.raises(ModelUnavailable):
            await pool.acquire(set(), deadline)
        pool.succeeded(a)
        pool.release(a)
        assert (await _take(pool, deadline)) is a

    asyncio.run(run())


async def _take(pool: EndpointPool, deadline: float):
    e = await pool.acquire(set(), deadline)
    pool.release(e)
    return e
