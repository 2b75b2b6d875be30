"""The shipped registry: every GPU profile fits its card, and `rerank-gateway plan` says so."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ops.cli import main
from core.config import RegistryError, load_registry, parse_registry
from core.budgets import usable_gb
from ops.plan import plan

SHIPPED = Path(__file__).resolve().parent.parent / "registry.yaml"
CARDS = ["T4", "L4", "A10G", "A100-40GB", "A100-80GB", "H100", "H200"]
HUB_MODELS = {
    "bge-reranker-large": "flag",
    "gte-multilingual-reranker-base": "gte",
    "qwen3-reranker-4b": "qwen3",
}


@pytest.fixture(scope="module")
def shipped():
    return load_registry(SHIPPED)


def test_shipped_registry_has_every_model_on_every_card(shipped):
    assert set(CARDS) <= set(shipped.gpu_types)
    assert {m: shipped.models[m].backend for m in HUB_MODELS} == HUB_MODELS
    for model_id in [*HUB_MODELS, "minilm"]:
        spec = shipped.models[model_id]
        assert spec.weights_gb and spec.activation_kb_per_token, model_id
        for key in [*CARDS, "cpu"]:
            assert key in spec.profiles, f"{model_id} has no {key} profile"
    # The hub models cannot be fetched offline: they load on first use, never at start.
    assert all(shipped.models[m].load == "lazy" for m in HUB_MODELS)
    assert shipped.models["qwen3-reranker-4b"].quantization == "nf4"


@pytest.mark.parametrize("card", CARDS)
def test_every_shipped_profile_fits_its_card(shipped, card):
    result = plan(shipped, card)
    assert result.ok, result.problems
    gpu = shipped.gpu_types[card]
    for m in result.models:
        assert m.device == "cuda" and m.profile == card
        assert m.budget_gb is not None, f"{m.model_id} on {card} has no memory budget"
        assert m.weights_gb + m.max_batch_tokens * m.activation_kb_per_token / 1024**2 <= m.budget_gb
        assert m.max_batch_tokens >= m.max_length
        if not gpu.bf16:
            assert m.dtype != "bfloat16"
    # Eager models load together at start; lazy ones may all be loaded later beside them.
    assert sum(m.budget_gb for m in result.models if m.load == "eager") <= usable_gb(gpu.memory_gb)
    assert sum(m.budget_gb for m in result.models if m.load != "off") <= usable_gb(gpu.memory_gb)


def test_qwen3_batch_of_16k_tokens_fits_6_gb_on_paper(shipped):
    spec = shipped.models["qwen3-reranker-4b"]
    assert spec.weights_gb + 16384 * spec.activation_kb_per_token / 1024**2 < 6


def test_plan_cli_prints_the_table_and_the_verdict(capsys):
    assert main(["plan", "--gpu", "T4", "--registry", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    for model_id in HUB_MODELS:
        assert model_id in out
    assert "act_kb/tok" in out and "budget_tok" in out
    assert "eager models: budgets" in out and ": fit" in out


def test_plan_reports_a_profile_that_does_not_fit(tmp_path, capsys):
    data = yaml.safe_load(SHIPPED.read_text())
    too_big = copy.deepcopy(data)
    too_big["models"]["qwen3-reranker-4b"]["profiles"]["T4"]["max_batch_tokens"] = 200_000
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(too_big))
    assert main(["plan", "--gpu", "T4", "--registry", str(path)]) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "problem: qwen3-reranker-4b" in out

    crowded = copy.deepcopy(data)
    for model in crowded["models"].values():
        model["profiles"]["T4"]["memory_budget_gb"] = 5
    path.write_text(yaml.safe_dump(crowded))
    assert main(["plan", "--gpu", "T4", "--registry", str(path)]) == 1
    assert "DO NOT FIT" in capsys.readouterr().out


def test_bfloat16_on_a_gpu_without_it_is_refused():
    data = yaml.safe_load(SHIPPED.read_text())
    data["models"]["qwen3-reranker-4b"]["profiles"]["T4"]["dtype"] = "bfloat16"
    with pytest.raises(RegistryError, match=r"qwen3-reranker-4b\.profiles\.T4\.dtype"):
        parse_registry(data)


def test_lazy_hub_models_are_unavailable_with_the_reason_not_a_crash():
    """Offline, the shipped hub models cannot load: each is reported unavailable with why, and the
    embedded default keeps serving."""
    from litestar.testing import TestClient

    from gateway.app import create_app

    data = yaml.safe_load(SHIPPED.read_text())
    # A smaller warm-up batch for the default model keeps this test quick on a shared CPU.
    data["models"]["minilm"]["profiles"]["cpu"]["max_batch_tokens"] = 512
    registry = parse_registry(data)
    with TestClient(create_app(registry, gpu_type="cpu", wait_for_models=True)) as client:
        ok = client.post("/v1/rerank", json={"query": "water", "documents": ["rivers carry water", "music"]})
        assert ok.status_code == 200
        for model_id in HUB_MODELS:
            resp = client.post("/v1/rerank", json={"model": model_id, "query": "q", "documents": ["d"]})
            assert resp.status_code == 503, resp.text
            assert model_id in resp.json()["message"] and "unavailable" in resp.json()["message"]
        states = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        for model_id in HUB_MODELS:
            assert states[model_id]["state"] == "unavailable" and states[model_id]["reason"]
        assert client.get("/health").status_code == 200


def test_nf4_on_a_backend_that_cannot_quantize_is_refused():
    data = yaml.safe_load(SHIPPED.read_text())
    data["models"]["bge-reranker-large"]["profiles"]["T4"]["quantization"] = "nf4"
    with pytest.raises(RegistryError, match=r"bge-reranker-large\.quantization"):
        parse_registry(data)
