"""`gte`: GTE cross-encoders (Alibaba-NLP/gte-multilingual-reranker-base) on transformers' native
`GteForSequenceClassification`.

The hub checkpoint's config.json says `model_type: "new"` and points `auto_map` at remote code
(Alibaba-NLP/new-impl). Running code fetched from a model repository is a hole in a multi-tenant server,
so the original config is translated field by field into a `GteConfig`; the weights load through
transformers' conversion table for "gte" (drops the `new.` prefix, splits the packed `qkv_proj` and
`up_gate_proj`). Anything in the original config that would change the computation and has no native
equivalent is refused with the field named, never silently dropped. `trust_remote_code: true` on the
model in the registry is the explicit opt-in to the original code instead.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from backends.flag import FlagBackend
from backends.request_encoder import RequestEncoder
from backends.source import resolve_source

log = logging.getLogger("rerank_gateway.gte")

# Original NewConfig fields copied as they are: same name, same meaning in GteConfig.
_COPIED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "classifier_dropout",
    "id2label", "label2id", "problem_type",
)
# Fields that must hold these values: any other value changes the math and has no native equivalent.
_REQUIRED = {
    "position_embedding_type": "rope",
    "layer_norm_type": "layer_norm",
    # log-n attention scaling multiplies queries by log_{max_pos}(length); GteAttention has no such term.
    "logn_attention_scale": False,
    # Unpacked q/k/v tensors have names the conversion table does not map.
    "pack_qkv": True,
}
# Fields that do not change the scores: speed switches of the remote code (xformers, unpadding), the
# clip of a scale that is off, bookkeeping.
_IGNORED = (
    "unpad_inputs", "use_memory_efficient_attention", "logn_attention_clip1", "auto_map", "architectures",
    "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "tie_word_embeddings",
)
# Fields translated by rope_parameters() and the label mapping.
_TRANSLATED = ("rope_theta", "rope_scaling", "num_labels")


class UnsupportedGteConfig(ValueError):
    pass


def rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """The native rope parameters for the original `rope_theta` / `rope_scaling`.

    The original NTKScalingRotaryEmbedding (fixed NTK, no `mixed_b`) always uses
        inv_freq_i = (theta * f) ** (-2i / d) / f ** (2 / d)
    i.e. plain RoPE at base theta * f with every frequency divided by f ** (2 / d): exactly transformers'
    "linear" rope type with rope_theta = theta * f and factor = f ** (2 / d).
    """
    theta = float(raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "ntk":
        raise UnsupportedGteConfig(f"rope_scaling.type {kind!r}: only 'ntk' exists in the original GTE code")
    if scaling.get("mixed_b") is not None:
        raise UnsupportedGteConfig("rope_scaling.mixed_b: mixed NTK scaling has no native transformers equivalent")
    factor = float(scaling["factor"])
    head_dim = raw["hidden_size"] // raw["num_attention_heads"]
    return {"rope_type": "linear", "rope_theta": theta * factor, "factor": factor ** (2 / head_dim)}


def gte_config_from_original(raw: dict[str, Any]):
    """A GteConfig equivalent to an original `model_type: "new"` config. Raises UnsupportedGteConfig."""
    from transformers import GteConfig

    archs = raw.get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UnsupportedGteConfig(f"architectures {archs}: not a sequence-classification (reranker) checkpoint")
    for key, want in _REQUIRED.items():
        if key in raw and raw[key] != want:
            raise UnsupportedGteConfig(f"{key}: {raw[key]!r} is not supported natively (needs {want!r})")
    unknown = sorted(set(raw) - set(_COPIED) - set(_REQUIRED) - set(_IGNORED) - set(_TRANSLATED))
    if unknown:
        log.warning("GTE config fields not translated (assumed not to affect scores): %s", ", ".join(unknown))
    kwargs = {k: raw[k] for k in _COPIED if k in raw}
    if "id2label" in kwargs:
        kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    elif "num_labels" in raw:
        kwargs["num_labels"] = raw["num_labels"]
    return GteConfig(**kwargs, rope_parameters=rope_parameters(raw))


def load_gte_config(source: str):
    """The GteConfig of a local directory or hub id, translating an original "new" config."""
    from transformers import GteConfig
    from transformers.utils import cached_file

    raw = json.loads(open(cached_file(source, "config.json"), encoding="utf-8").read())
    model_type = raw.get("model_type")
    if model_type == "gte":
        return GteConfig.from_pretrained(source)
    if model_type == "new":
        return gte_config_from_original(raw)
    raise UnsupportedGteConfig(f"model_type {model_type!r}: the gte backend loads 'gte' or 'new' checkpoints")


class GteBackend(FlagBackend):
    """A cross-encoder like `flag` (same pair format, same sigmoid score); only the loading differs."""

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, GteForSequenceClassification

        path = resolve_source(self.spec.source)
        if self.spec.trust_remote_code:
            # Explicit opt-in in the registry: run the checkpoint's own modeling code.
            model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, dtype=self.load_dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        else:
            config = load_gte_config(path)
            model, info = GteForSequenceClassification.from_pretrained(
                path, config=config, dtype=self.load_dtype, output_loading_info=True
            )
            # A tensor the conversion table did not map would stay randomly initialised: refuse.
            if info.get("missing_keys"):
                raise RuntimeError(f"checkpoint lacks weights: {sorted(info['missing_keys'])[:5]}")
            # Passing the config keeps AutoTokenizer from reading config.json, whose auto_map would ask
            # for the remote code.
            self.tokenizer = AutoTokenizer.from_pretrained(path, config=config)
        self.model = model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        self.encoder = RequestEncoder(self.tokenizer)
        self.start()
