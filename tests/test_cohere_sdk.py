"""The official Cohere SDK, unchanged, against `rerank-gateway serve` on the default registry, started as a
subprocess (tests/conftest.py's default_server)."""

from __future__ import annotations


import cohere
import pytest


@pytest.fixture(scope="module")
def server_url(default_server):
    return default_server


DOCS = ["Carson City is the capital city of the American state of Nevada.",
        "The Commonwealth of the Northern Mariana Islands is a group of islands in the Pacific Ocean.",
        "Washington, D.C. is the capital of the United States.",
        "Capital punishment has existed in the United States since before it was a country."]
QUERY = "What is the capital of the United States?"


def test_cohere_client_v1(server_url):
    co = cohere.Client(api_key="unused", base_url=server_url)
    resp = co.rerank(query=QUERY, documents=DOCS, top_n=3, model="minilm", return_documents=True)
    assert len(resp.results) == 3
    assert resp.results[0].index == 2
    assert resp.results[0].document.text == DOCS[2]
    assert resp.results[0].relevance_score >= resp.results[1].relevance_score
    assert resp.meta.billed_units.search_units == 1


def test_cohere_client_v2(server_url):
    co = cohere.ClientV2(api_key="unused", base_url=server_url)
    resp = co.rerank(model="minilm", query=QUERY, documents=DOCS, top_n=2)
    assert [r.index for r in resp.results][0] == 2
    assert len(resp.results) == 2
    assert resp.meta.api_version.version == "2"
