"""The official Cohere SDK, unchanged, against `rerank-gateway serve` started as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cohere
import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server_url():
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--registry", str(ROOT / "registry.yaml"), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError("server not ready in time")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
