"""Padding-free ("varlen") batches for the encoder cross-encoders (BERT, XLM-RoBERTa, GTE).

A padded batch costs longest x count tokens in every linear layer; a packed one costs the real tokens. The
pairs of a batch are concatenated into one row, each keeps its own positions, and attention runs per pair
through cumulative sequence offsets (cu_seqlens), as flash-attention's varlen kernels take them:
- on a GPU, torch.nn.attention.varlen.varlen_attn (PyTorch's flash-attention varlen kernel), or
  flash_attn.flash_attn_varlen_func when that package is installed;
- elsewhere (the CPU, where the tests check it) scaled_dot_product_attention pair by pair: the same math,
  not a fast path.
The transformers models pass unknown keyword arguments down to their attention function, so the offsets
reach it through the model's own forward; the classifier head then reads each pair's first token.

GPU figures (fraction of peak FLOP/s, packed vs padded on mixed lengths) are not measured yet: no GPU was
lent when this was written. The CPU parity test holds the packed scores equal to the padded ones.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("rerank_gateway.varlen")

ATTN_IMPLEMENTATION = "rerank_varlen"
# Model types whose embeddings take per-pair position ids and whose head reads the first token.
SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta", "roberta", "gte")


def _gpu_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        return lambda q, k, v, cu_q, cu_k, max_q, max_k, scale=None: flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale
        )
    except ImportError:
        return None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs: Any):
    """transformers attention function over one packed row: query/key/value [1, heads, tokens, dim];
    returns [1, tokens, heads, dim] as the library's attention functions do."""
    cu = kwargs["cu_seq_lens_q"]
    max_len = int(kwargs["max_length_q"])
    if query.is_cuda and (kernel := _gpu_kernel()) is not None:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
        out = kernel(q, k, v, cu, cu, max_len, max_len, scale=scaling)
        return out.unsqueeze(0), None
    bounds = cu.tolist()
    parts = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scale=scaling)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention)
    # No mask: the offsets say where each pair starts and ends.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *args, **kwargs: None)


def supports(model: torch.nn.Module) -> bool:
    return getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES and hasattr(model, "classifier")


def enable(model: torch.nn.Module) -> None:
    register()
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    for sub in model.modules():
        if hasattr(sub, "config") and sub.config is not model.config:
            sub.config._attn_implementation = ATTN_IMPLEMENTATION


def pack(
    rows: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None, position_offset: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """One packed row from token sequences (the tokenizer's lists or the engine's compact int32 / int8
    arrays): input_ids, position_ids (each pair from position_offset), token_type_ids, and the
    cumulative offsets."""
    lengths = torch.tensor([len(r) for r in rows])
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    ids = _concat(rows)
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()]) + position_offset
    out = {
        "input_ids": ids[None],
        "position_ids": positions[None],
        "cu_seq_lens": cu,
        "max_length": torch.tensor(int(lengths.max())),
    }
    if types is not None:
        out["token_type_ids"] = _concat(types)[None]
    # max_length stays on the host: the kernels take it as a Python int.
    return {k: v if k == "max_length" else v.to(device, non_blocking=True) for k, v in out.items()}


def _concat(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """The rows end to end as one int64 tensor, copied through numpy (no Python int per token)."""
    return torch.from_numpy(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]))


def position_offset(model: torch.nn.Module) -> int:
    """Where a pair's positions start: RoBERTa-style embeddings count from padding_idx + 1."""
    padding_idx = getattr(model.base_model.embeddings, "padding_idx", None)
    return padding_idx + 1 if padding_idx is not None and model.config.model_type != "bert" else 0


def packed_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One logit per pair of a packed batch."""
    cu = inputs["cu_seq_lens"]
    max_len = int(inputs["max_length"])
    kwargs = {k: inputs[k] for k in ("input_ids", "position_ids", "token_type_ids") if k in inputs}
    hidden = model.base_model(
        **kwargs, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len, return_dict=True
    ).last_hidden_state[0]
    first = hidden[cu[:-1].long()].unsqueeze(1)  # [pairs, 1, hidden]: each pair's first token
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        return model.classifier(pooler(first)).view(-1).float()  # BERT / GTE: pooler, then a linear layer
    return model.classifier(first).view(-1).float()  # RoBERTa-style head reads token 0 itself
