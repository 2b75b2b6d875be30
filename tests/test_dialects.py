"""Voyage and TEI as served dialects: Voyage's own SDK, unchanged, against `rerank-gateway serve` on the
default registry (tests/conftest.py's default_server); TEI's shape field by field (its router's types.rs /
OpenAPI document); each dialect's error body for its bad inputs, auth and unknown models included."""

from __future__ import annotations

import pytest
import voyageai
import voyageai.error

from tenancy.auth import key_sha256
from core.config import parse_registry
from tests.conftest import app_client
from tests.routes_fixtures import DOCS, QUERY, minilm

LONG = "word " * 400


@pytest.fixture(scope="module")
def server_url(default_server):
    return default_server


def test_voyage_sdk_unchanged(server_url):
    vo = voyageai.Client(api_key="unused", base_url=f"{server_url}/voyage/v1", max_retries=0)
    resp = vo.rerank(QUERY, DOCS, model="minilm", top_k=3)
    assert len(resp.results) == 3
    assert resp.results[0].index == 1  # "paris is the capital of france and the eiffel tower ..."
    assert resp.results[0].document == DOCS[1]
    scores = [r.relevance_score for r in resp.results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert resp.total_tokens > 0
    # truncation=False refuses an over-long document with Voyage's 400 and its {"detail"} message.
    with pytest.raises(voyageai.error.InvalidRequestError, match="truncation is off"):
        vo.rerank(QUERY, [LONG], model="minilm", truncation=False)
    with pytest.raises(voyageai.error.APIError, match="not found"):
        vo.rerank(QUERY, DOCS, model="no-such-model")


def test_voyage_shape(client):
    r = client.post("/voyage/v1/rerank", json={"query": QUERY, "documents": DOCS[:5], "model": "minilm", "top_k": 2, "return_documents": True})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list" and body["model"] == "minilm" and body["usage"]["total_tokens"] > 0
    assert [set(d) for d in body["data"]] == [{"index", "relevance_score", "document"}] * 2
    assert all(d["document"] == DOCS[d["index"]] for d in body["data"])  # a plain string, not {text}
    plain = client.post("/voyage/v1/rerank", json={"query": QUERY, "documents": DOCS[:5]}).json()
    assert [set(d) for d in plain["data"]] == [{"index", "relevance_score"}] * 5


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"query": QUERY, "documents": []}, 400, "must not be empty"),
        ({"query": QUERY, "documents": ["x"] * 51}, 400, "the maximum is 50"),
        ({"query": QUERY, "documents": ["x"], "top_k": 0}, 400, "top_k"),
        ({"query": QUERY}, 400, "documents"),
        ({"query": QUERY, "documents": [1, 2]}, 400, "documents"),
        ({"query": QUERY, "documents": [LONG], "truncation": False}, 400, "truncation is off"),
        ({"query": QUERY, "documents": ["x"], "model": "nope"}, 404, "not found"),
    ],
)
def test_voyage_errors(client, body, status, says):
    r = client.post("/voyage/v1/rerank", json=body)
    assert r.status_code == status
    assert set(r.json()) == {"detail"} and says in r.json()["detail"]


def test_voyage_caps_at_1000_documents():
    with app_client(parse_registry({"default_model": "m", "models": {"m": minilm()}, "usage": {"path": None}})) as c:
        r = c.post("/voyage/v1/rerank", json={"query": "q", "documents": ["x"] * 1001})
        assert r.status_code == 400 and "the maximum is 1000" in r.json()["detail"]
        assert c.post("/v1/rerank", json={"query": "q", "documents": ["x"] * 1001}).status_code == 200


@pytest.mark.parametrize("path", ["/tei/rerank", "/rerank"])
def test_tei_shape_field_by_field(client, path):
    texts = DOCS[:6]
    r = client.post(path, json={"query": QUERY, "texts": texts, "return_text": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    ranks = r.json()
    assert isinstance(ranks, list) and len(ranks) == len(texts)  # every text, no top_n
    for rank in ranks:
        assert list(rank) == ["index", "text", "score"]  # TEI's Rank: index, text (optional), score
        assert isinstance(rank["index"], int) and isinstance(rank["score"], float)
        assert rank["text"] == texts[rank["index"]]
    assert sorted(rank["index"] for rank in ranks) == list(range(len(texts)))
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)
    assert int(r.headers["x-compute-tokens"]) > 0
    # Without return_text the key is absent (skip_serializing_if), and scores match the Cohere route's.
    bare = client.post(path, json={"query": QUERY, "texts": texts}).json()
    assert [list(x) for x in bare] == [["index", "score"]] * len(texts)
    cohere = client.post("/v1/rerank", json={"query": QUERY, "documents": texts}).json()["results"]
    assert [(x["index"], x["score"]) for x in bare] == [(x["index"], x["relevance_score"]) for x in cohere]
    # raw_scores: the model's own output, not the [0, 1] relevance.
    raw = client.post(path, json={"query": QUERY, "texts": texts, "raw_scores": True}).json()
    assert [x["index"] for x in raw] == [x["index"] for x in bare]
    assert [x["score"] for x in raw] != [x["score"] for x in bare]
    # TEI's optional fields, as TEI's own clients send them.
    full = {"query": QUERY, "texts": texts, "truncate": True, "truncation_direction": "Right", "raw_scores": False, "return_text": False}
    assert client.post(path, json=full).json() == bare


@pytest.mark.parametrize("path", ["/tei/rerank", "/rerank"])
@pytest.mark.parametrize(
    "body, status, error_type, says",
    [
        ({"query": QUERY, "texts": []}, 400, "Empty", "`texts` cannot be empty"),
        ({"query": QUERY, "texts": ["x"] * 51}, 422, "Validation", "batch size 51 > maximum allowed batch size 50"),
        ({"query": QUERY, "texts": "not a list"}, 422, "Validation", "texts"),
        ({"texts": ["x"]}, 422, "Validation", "query"),
        ({"query": QUERY, "texts": [LONG], "truncate": False}, 422, "Validation", "truncation is off"),
        # Only right truncation exists here: asking for left refuses over-long texts instead of cutting wrongly.
        ({"query": QUERY, "texts": [LONG], "truncation_direction": "left"}, 422, "Validation", "truncation is off"),
        ({"query": QUERY, "texts": ["x"], "truncation_direction": "up"}, 422, "Validation", "truncation_direction"),
        ({"query": QUERY, "texts": ["x"], "model": "nope"}, 404, "Validation", "not found"),
    ],
)
def test_tei_errors(client, path, body, status, error_type, says):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"}
    assert r.json()["error_type"] == error_type and says in r.json()["error"]


def test_tei_short_text_with_left_truncation_is_fine(client):
    assert client.post("/tei/rerank", json={"query": QUERY, "texts": ["short"], "truncation_direction": "left"}).status_code == 200


def test_bare_rerank_still_speaks_cohere(client):
    r = client.post("/rerank", json={"query": QUERY, "documents": DOCS[:3], "top_n": 1, "return_documents": True})
    assert r.status_code == 200 and r.json()["results"][0]["document"] == {"text": DOCS[1]}
    bad = client.post("/rerank", json={"query": QUERY, "documents": []})
    assert bad.status_code == 400 and set(bad.json()) == {"id", "message"}
    garbage = client.post("/rerank", content=b"{nope", headers={"content-type": "application/json"})
    assert garbage.status_code == 400 and "not valid JSON" in garbage.json()["message"]


def test_auth_errors_in_each_dialect():
    registry = parse_registry(
        {"default_model": "m", "models": {"m": minilm()}, "usage": {"path": None}, "tenants": {"t": {"api_key_sha256": key_sha256("k-t")}}}
    )
    with app_client(registry) as c:
        voyage = c.post("/voyage/v1/rerank", json={"query": "q", "documents": ["x"]})
        assert voyage.status_code == 401 and set(voyage.json()) == {"detail"}
        tei = c.post("/tei/rerank", json={"query": "q", "texts": ["x"]})
        assert tei.status_code == 401 and set(tei.json()) == {"error", "error_type"}
        # On the shared /rerank the key is checked before the body says which dialect it is; TEI itself
        # answers 401 with an empty body, so its clients read only the status.
        assert c.post("/rerank", json={"query": "q", "texts": ["x"]}).status_code == 401
        cohere = c.post("/rerank", json={"query": "q", "documents": ["x"]})
        assert cohere.status_code == 401 and set(cohere.json()) == {"id", "message"}
        ok = c.post("/voyage/v1/rerank", json={"query": "q", "documents": ["x"]}, headers={"authorization": "Bearer k-t"})
        assert ok.status_code == 200


# Each rule an OpenAPI schema can state, as the document states it, and the same body refused on the wire in
# the dialect's shape. (Issue 20: schemathesis built these schema-valid requests and got 400s.)
STATED_RULES = [
    # (path, schema, property, keyword path, body that breaks it, status, error key, what the error says)
    ("/tei/rerank", "TeiRerankRequest", "texts", ("minItems",), {"query": QUERY, "texts": []}, 400, "error", "`texts` cannot be empty"),
    ("/voyage/v1/rerank", "VoyageRerankRequest", "documents", ("minItems",), {"query": QUERY, "documents": []}, 400, "detail", "documents must not be empty"),
    ("/voyage/v1/rerank", "VoyageRerankRequest", "top_k", ("minimum",), {"query": QUERY, "documents": ["x"], "top_k": 0}, 400, "detail", "top_k"),
    ("/v2/rerank", "CohereRerankRequest", "rank_fields", ("items", "minLength"), {"query": QUERY, "documents": [{"": "x"}], "rank_fields": [""]}, 400, "message", "rank_fields[0] must not be empty"),
    ("/v1/rerank", "CohereRerankRequest", "documents", ("items", "anyOf", 1, "minProperties"), {"query": QUERY, "documents": ["a", {}]}, 400, "message", "documents[1] must not be empty"),
]


@pytest.mark.parametrize("path, schema, prop, keywords, body, status, key, says", STATED_RULES, ids=[f"{r[0]}:{r[2]}" for r in STATED_RULES])
def test_the_openapi_document_states_each_rule_the_server_enforces(client, path, schema, prop, keywords, body, status, key, says):
    stated = client.get("/schema/openapi.json").json()["components"]["schemas"][schema]["properties"][prop]
    for keyword in keywords:
        stated = stated[keyword]
    assert stated == 1
    r = client.post(path, json=body)
    assert r.status_code == status and says in r.json()[key], r.text
    if path == "/tei/rerank":
        assert r.json()["error_type"] == "Empty"
        assert client.post("/rerank", json=body).json() == r.json()  # the bare route, in TEI's shape too
