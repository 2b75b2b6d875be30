"""Padded batches' attention masks built on the device, with no host read in the forward.

transformers builds a padded batch's attention mask inside the forward, and for SDPA it first asks whether
the mask could be left out: for an encoder, whether no token of the batch is padding (`padding_mask.all()`),
for a decoder, whether the padding allows a plain causal mask. The answer is read on the host. On a GPU that
read is a device-to-host copy that waits for everything queued on the stream before it. The engine's two
inference threads share the model's CUDA stream (engine.inference): the thread launching the next batch
would wait there, holding the launch lock, for the other thread's whole batch, and the device would then idle
while the rest of the batch is launched. The gateway's padded batches nearly always hold padding, so the mask
is rarely left out anyway: this attention implementation is transformers' SDPA with the mask always built,
on the device. (Under tracing, as in an ONNX or OpenVINO export, transformers never leaves it out: exports are
unchanged.)

Packed batches (backends.varlen) have no mask to build. Models that run their own modeling code
(`trust_remote_code`) or another attention implementation keep theirs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

SDPA_DEVICE_MASK = "rerank_sdpa_device_mask"


@functools.cache
def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def mask(*args: Any, **kwargs: Any) -> Any:
        return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})

    AttentionInterface.register(SDPA_DEVICE_MASK, sdpa_attention_forward)
    AttentionMaskInterface.register(SDPA_DEVICE_MASK, mask)


def enable(model: torch.nn.Module) -> bool:
    """Switch a transformers model on SDPA to the device-built mask; False (and nothing changed) for any
    other model or attention implementation."""
    if not type(model).__module__.startswith("transformers.") or model.config._attn_implementation != "sdpa":
        return False
    register()
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = SDPA_DEVICE_MASK
    return True
