"""Honest FLOP counts: the work a pair of n REAL tokens needs, not the padded rectangle a batch computes.

Per pair: 2 x (every linear weight of the encoder/decoder) x n, plus attention's QK^T and AV, 4 x layers x
width x n^2. Padding, the classifier head and Qwen3's lm_head (never run: the gateway reads two rows of it)
are not counted. "Of peak" divides the rate by a matmul measured on the same card in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class FlopModel:
    linear_params: int
    layers: int
    width: int  # attention width: heads x head_dim (Qwen3-4B: 32 x 128 = 4096, not its hidden 2560)

    def pair(self, n: int) -> float:
        return 2.0 * self.linear_params * n + 4.0 * self.layers * self.width * n * n

    def total(self, lengths: Iterable[int]) -> float:
        return sum(self.pair(int(n)) for n in lengths)


def flop_model(model_dir: str | Path) -> FlopModel:
    """Counts the linear weights of the checkpoint's base model, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    linear = sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopModel(linear_params=linear, layers=config.num_hidden_layers, width=config.num_attention_heads * head_dim)


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def of_peak(tflops_value: float, ceiling_tflops: float | None) -> float | None:
    """The fraction of the matmul ceiling measured in this run; None without one (never a datasheet)."""
    return tflops_value / ceiling_tflops if ceiling_tflops else None
