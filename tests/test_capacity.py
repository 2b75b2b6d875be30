"""`rerank-gateway plan --rps/--docs/--doc-tokens`: workers per GPU type (or CPU cores) from measured profiles."""

from __future__ import annotations

import math

import pytest
import yaml

from core.config import RegistryError, parse_registry
from ops import capacity
from ops.cli import main


def _registry(tmp_path, **h100):
    data = {
        "default_model": "bge",
        "models": {
            "bge": {
                "backend": "flag",
                "source": "BAAI/bge-reranker-large",
                "max_length": 512,
                "profiles": {
                    "H100": {"max_batch_tokens": 65536, "dtype": "float16", **h100},
                    "cpu": {"max_batch_tokens": 1024, "measured_pairs_per_s": 50, "measured_cpu_cores": 2},
                    "T4": {"max_batch_tokens": 16384, "dtype": "float16"},
                },
            }
        },
        "gpu_types": {"H100": {"match": "H100", "memory_gb": 80}, "T4": {"match": "T4", "memory_gb": 16, "bf16": False}},
    }
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(out: str) -> dict[str, list[str]]:
    return {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("bge ")}


def test_workers_from_measured_tokens_per_s(tmp_path, capsys):
    path = _registry(tmp_path, measured_tokens_per_s=100_000, measured_pairs_per_s=400)
    code = main(["plan", "--registry", str(path), "--rps", "10", "--docs", "100", "--doc-tokens", "200"])
    out = capsys.readouterr().out
    assert code == 0
    rows = _rows(out)
    pair = 32 + 200 + capacity.SPECIAL_TOKENS
    per_worker = 100_000 / pair
    need = math.ceil(1000 / (per_worker * 0.7))
    assert rows["H100"][2] == str(pair) and float(rows["H100"][3]) == pytest.approx(per_worker, abs=0.1)
    assert rows["H100"][4] == str(need) == "4" and rows["H100"][5] == "5"
    # The cpu profile has pairs/s only: taken as measured, cores = workers x measured cores.
    cpu_workers = math.ceil(1000 / (50 * 0.7))
    assert rows["cpu"][4] == str(cpu_workers) and rows["cpu"][6] == str(cpu_workers * 2)
    # Unmeasured profiles are named as such, never guessed.
    assert "not measured" in out.split("T4", 1)[1].splitlines()[0]
    assert "assumptions:" in out


def test_long_documents_truncate_at_max_length_and_warn_past_the_timeout(tmp_path, capsys):
    path = _registry(tmp_path, measured_tokens_per_s=10_000)
    code = main(["plan", "--registry", str(path), "--rps", "1", "--docs", "2000", "--doc-tokens", "5000", "--model", "bge"])
    out = capsys.readouterr().out
    assert code == 0
    rows = _rows(out)
    assert rows["H100"][2] == "512"  # truncated at the profile's max_length
    # 2000 pairs x 512 tokens / 10,000 tokens/s = 102 s alone, past the 60 s request timeout.
    assert "warning: bge on H100" in out and "102.4 s" in out


def test_no_measurement_exits_1_and_bad_flags_exit_2(tmp_path, capsys):
    data = yaml.safe_load(_registry(tmp_path).read_text())
    data["models"]["bge"]["profiles"]["cpu"] = {"max_batch_tokens": 1024}
    path = tmp_path / "unmeasured.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", "--registry", str(path), "--rps", "5", "--docs", "10", "--doc-tokens", "100"]) == 1
    assert "no measured profile" in capsys.readouterr().out
    assert main(["plan", "--registry", str(path), "--rps", "5"]) == 2
    assert main(["plan", "--registry", str(path), "--rps", "-1", "--docs", "10", "--doc-tokens", "100"]) == 2
    assert main(["plan", "--registry", str(path), "--rps", "5", "--docs", "10", "--doc-tokens", "100", "--model", "nope"]) == 2


def test_measured_figures_must_be_positive():
    with pytest.raises(RegistryError, match=r"models.m.profiles.cpu.measured_pairs_per_s: must be > 0"):
        parse_registry({"default_model": "m", "models": {"m": {"backend": "embedding", "source": "x", "profiles": {"cpu": {"measured_pairs_per_s": 0}}}}})


def test_the_shipped_registry_answers_for_minilm_on_cpu_from_its_tuned_figures(capsys):
    from pathlib import Path

    from core.config import load_registry

    shipped = Path(__file__).resolve().parent.parent / "registry.yaml"
    cpu = load_registry(shipped).models["minilm"].profiles["cpu"]
    assert cpu.measured_tokens_per_s and cpu.measured_pairs_per_s and cpu.measured_cpu_cores
    # The file says where the figures came from.
    assert "rerank-gateway tune minilm" in shipped.read_text()
    assert main(["plan", "--registry", str(shipped), "--rps", "10", "--docs", "100", "--doc-tokens", "200"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("minilm ") and line.split()[1] == "cpu")
    pair = 32 + 200 + capacity.SPECIAL_TOKENS
    workers = math.ceil(1000 / (cpu.measured_tokens_per_s / pair * 0.7))
    assert row[2] == str(pair) and row[4] == str(workers) and row[6] == str(workers * cpu.measured_cpu_cores)
    assert f"on {cpu.measured_cpu_cores} cores per worker" in out
