"""Padding-free ("varlen") batches for the encoder cross-encoders (BERT, XLM-RoBERTa, GTE).

A padded batch costs longest x count tokens in every linear layer; a packed one costs the real tokens. The
pairs of a batch are concatenated into one row, each keeps its own positions, and attention runs per pair
through cumulative sequence offsets (cu_seqlens), as flash-attention's varlen kernels take them:
- on a GPU the flash-attention kernels run on (Ampere or newer, float16 / bfloat16),
  torch.nn.attention.varlen.varlen_attn (PyTorch's flash-attention varlen kernel), or
  flash_attn.flash_attn_varlen_func when that package is installed;
- elsewhere (the CPU, where the tests check it, a T4 or V100, float32) scaled_dot_product_attention pair by
  pair: the same math, not a fast path, so `padding_free: auto` packs only where the kernel runs.
The transformers models pass unknown keyword arguments down to their attention function, so the offsets
reach it through the model's own forward; the classifier head then reads each pair's first token.

GPU figures (fraction of peak FLOP/s, packed vs padded on mixed lengths) are not measured yet: no GPU was
lent when this was written. The CPU parity test holds the packed scores equal to the padded ones.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backends.base import Rows, to_device
from backends.token_arrays import offsets_of

log = logging.getLogger("rerank_gateway.varlen")

ATTN_IMPLEMENTATION = "rerank_varlen"
# Model types whose embeddings take per-pair position ids and whose head reads the first token.
SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta", "roberta", "gte")


@functools.cache
def _gpu_kernel():
    """(kernel, takes_scale): PyTorch's varlen_attn (its `scale` argument came after 2.10), or flash-attn's."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn, "scale" in inspect.signature(varlen_attn).parameters
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        return (lambda q, k, v, cu_q, cu_k, max_q, max_k, scale=None: flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale
        )), True
    except ImportError:
        return None, False


# flash-attention's kernels (PyTorch's and the flash_attn package's) take 16-bit inputs on compute
# capability 8.0 (Ampere) and newer; a T4 (7.5) or V100 (7.0), or float32 anywhere, gets no kernel.
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MIN_CAPABILITY = (8, 0)


def flash_capable(capability: tuple[int, int], dtype: torch.dtype) -> bool:
    return tuple(capability) >= FLASH_MIN_CAPABILITY and dtype in FLASH_DTYPES


@functools.cache
def kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed attention on this device and dtype runs a varlen kernel rather than pair by pair."""
    if device.type != "cuda" or _gpu_kernel()[0] is None:
        return False
    return flash_capable(torch.cuda.get_device_capability(device), dtype)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs: Any):
    """transformers attention function over one packed row: query/key/value [1, heads, tokens, dim];
    returns [1, tokens, heads, dim] as the library's attention functions do."""
    cu = kwargs["cu_seq_lens_q"]
    max_len = int(kwargs["max_length_q"])
    if kernel_runs(query.device, query.dtype):
        kernel, takes_scale = _gpu_kernel()
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
        default = query.shape[-1] ** -0.5
        if scaling is None or abs(scaling - default) <= 1e-6 * default:
            out = kernel(q, k, v, cu, cu, max_len, max_len)
        elif takes_scale:
            out = kernel(q, k, v, cu, cu, max_len, max_len, scale=scaling)
        else:  # a kernel without a scale argument: the query carries the model's own
            out = kernel(q * (scaling / default), k, v, cu, cu, max_len, max_len)
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


def pack(rows: Rows, position_offset: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One packed row from a batch's rows (tokens already end to end): input_ids, position_ids (each pair
    from position_offset), token_type_ids, and the cumulative offsets. Pinned on a GPU, copied without
    blocking."""
    lengths = rows.lengths.astype(np.int64)
    offsets = offsets_of(lengths)
    total = int(offsets[-1])
    positions = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], lengths) + position_offset
    host = {
        "input_ids": torch.from_numpy(rows.ids.astype(np.int64))[None],
        "position_ids": torch.from_numpy(positions)[None],
        "cu_seq_lens": torch.from_numpy(offsets.astype(np.int32)),
    }
    if rows.types is not None:
        host["token_type_ids"] = torch.from_numpy(rows.types.astype(np.int64))[None]
    out = {k: to_device(v, device) for k, v in host.items()}
    # max_length stays on the host: the kernels take it as a Python int.
    out["max_length"] = torch.tensor(int(lengths.max()))
    return out


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
