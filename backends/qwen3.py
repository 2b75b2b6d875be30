"""`qwen3`: Qwen3-Reranker, a causal LM that judges a (query, document) pair by its next token, "yes" or "no".

What makes it score right and fit a small GPU:
- The official chat template around `<Instruct>: ... <Query>: ... <Document>: ...`, with the default
  instruction unless the request or the registry gives one; without it scores are close to random.
- Left padding, so that the last position of every row is the token the answer is read at.
- Score = logit_yes - logit_no at the last position (sigmoid of it = softmax over [no, yes], the official
  score), computed in float32 from the final hidden state and the two lm_head rows only. The usual path
  asks for logits over the whole 151,669-word vocabulary at every position: gigabytes per batch that are
  thrown away. Here no tensor with the vocabulary dimension is ever made.
- Weights in 4-bit (bitsandbytes nf4, double quantization) when the registry says `quantization: nf4`,
  computing in bfloat16 (float16 on GPUs without bf16).
- Shared prefix: every pair of a request starts with the same system prompt, instruction and query. That
  prefix runs once; its key/value cache is kept (a small LRU keyed by the prefix's token ids, so the
  request's later batches reuse it) and every document runs only its own tokens against it
  (backends.prefix_cache). Pairs of several requests in one batch run as one group per prefix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backends import device_mask
from backends.base import Backend, Batch, Prepared, Rows, concat_prepared, cuda_has_native_bf16, cut_text, to_device
from backends.prefix_cache import PrefixCache, SharedPrefix, common_prefix_length
from backends.token_arrays import assemble, flatten, gather_index, offsets_of, padded_mask
from backends.request_encoder import RequestEncoder
from backends.source import resolve_source

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def pair_text(instruction: str, query: str, document: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


@dataclass(slots=True)
class PrefixGroup:
    """Rows of a batch that share one prefix: their own tokens, right-padded after it."""

    prefix: SharedPrefix
    rows: torch.Tensor  # positions in the batch
    input_ids: torch.Tensor  # [n, width] tokens after the prefix, right-padded
    lengths: torch.Tensor  # [n] real tokens after the prefix


@dataclass
class PrefixBatch(Batch):
    """A batch scored as prefix groups, plus the rows with no shared prefix as one plain batch."""

    size: int = 0
    groups: list[PrefixGroup] = field(default_factory=list)
    plain_rows: torch.Tensor | None = None


class Qwen3Backend(Backend):
    padding_side = "left"
    score_transform = "sigmoid"
    # Run a request's shared prefix once (False: every pair runs whole, as before; the benchmark's "off").
    share_prefix = True

    def __init__(self, name, spec, eff) -> None:
        super().__init__(name, spec, eff)
        self.prefixes = PrefixCache()
        if eff.dtype == "auto" and self.device.type == "cuda":
            # Qwen3 overflows in float16; bfloat16 wherever the GPU has it natively (not emulated).
            self.dtype = torch.bfloat16 if cuda_has_native_bf16(self.device) else torch.float16

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_source(self.spec.source)
        trust = self.spec.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "right"
        # split_special_tokens: "<|im_end|>" inside user text stays plain text, so a document cannot close
        # the user turn and answer "yes" for the model.
        self.encoder = RequestEncoder(self.tokenizer, split_special_tokens=True)
        kwargs: dict = {"dtype": self.dtype, "trust_remote_code": trust}
        if self.eff.quantization == "nf4":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self.dtype,
            )
            # bitsandbytes quantizes while placing the weights: they go straight to their device.
            kwargs["device_map"] = {"": self.device}
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        if info.get("missing_keys"):
            raise RuntimeError(f"checkpoint lacks weights: {sorted(info['missing_keys'])[:5]}")
        if self.eff.quantization != "nf4":
            model = model.to(self.device)
        self.model = model.eval()
        device_mask.enable(self.model)  # no host read in a padded forward (backends.device_mask says why)

        self.yes_id, self.no_id = (self._single_token(w) for w in ("yes", "no"))
        weight = model.get_output_embeddings().weight  # lm_head; kept in 16-bit by bitsandbytes
        # The 1-row classifier: logit_yes - logit_no = h . (W[yes] - W[no]), in float32.
        self.yes_no = (weight[self.yes_id].float() - weight[self.no_id].float()).to(self.device)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.prefix_ids = self.tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
        self.suffix_ids = self.tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]
        self.prefix_row_share = prefix_row_share(model.config)

    def _single_token(self, word: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(word)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise RuntimeError(f"the tokenizer has no single token {word!r}: not a Qwen3-Reranker tokenizer")
        return token_id

    # -- per request ------------------------------------------------------------------------------------
    def prepare(self, query, documents, *, max_length, max_chunks, instruction, max_doc_tokens=None) -> Prepared:
        """prefix + tokens(<Instruct>/<Query>/<Document>) + suffix; only the middle part is truncated, from
        its end, to max_length - len(prefix) - len(suffix), as the official code does. A query that would
        leave the document less than a quarter of that is cut first."""
        encoder = self.encoder
        instruction = instruction or self.spec.instruction or DEFAULT_INSTRUCTION
        budget = max(1, max_length - len(self.prefix_ids) - len(self.suffix_ids))
        q_ids = encoder.ids(cut_text(query, budget))
        if len(q_ids) > budget * 3 // 4:
            query = self.tokenizer.decode(q_ids[: budget * 3 // 4])
        # The template's fixed part before the document: instruction, query and "<Document>:".
        head = encoder.ids(pair_text(instruction, query, "")[:-1])
        if max_doc_tokens is not None:
            budget = min(budget, len(head) + max_doc_tokens)
        prefix_ids, suffix_ids = np.asarray(self.prefix_ids, np.int32), np.asarray(self.suffix_ids, np.int32)
        middles: list[list[int]] = []
        doc_index: list[int] = []
        cut_docs: list[int] = []
        if max_chunks <= 1:
            docs = [cut_text(d, budget) for d in documents]
            texts = [pair_text(instruction, query, d) for d in docs]
            for k, middle in enumerate(encoder.token_lists(texts)):
                middles.append(middle[:budget])
                doc_index.append(k)
                if len(middle) > budget or len(docs[k]) < len(documents[k]):
                    cut_docs.append(k)
        else:
            # Chunks: the instruction and query head every window of the document. The head ends at
            # "<Document>:" and each document starts with its space, which is where the byte-level
            # pre-tokenizer splits anyway, so a one-chunk document tokenizes as the whole text would.
            window = max(1, budget - len(head))
            docs = [cut_text(d, window * max_chunks) for d in documents]
            for k, ids in enumerate(encoder.token_lists([" " + d for d in docs])):
                for start in range(0, max(len(ids), 1), window)[:max_chunks]:
                    middles.append(ids[start : start + window])
                    doc_index.append(k)
                if len(ids) > window * max_chunks or len(docs[k]) < len(documents[k]):
                    cut_docs.append(k)
            prefix_ids = np.concatenate([prefix_ids, np.asarray(head, np.int32)])
        ids, lengths = assemble(prefix_ids, middles, suffix_ids)
        # What every pair of this request starts with; each keeps at least its last token, the one scored.
        shared = common_prefix_length(ids, lengths)
        context = SharedPrefix(ids[:shared]) if shared > 1 else None
        return Prepared(
            ids=ids, lengths=lengths, doc_index=np.asarray(doc_index, np.int32), n_docs=len(documents), context=context,
            tokens=int(lengths.sum()), cut_docs=cut_docs, shared=shared if context is not None else 0,
        )

    def merge(self, parts: list[Prepared]) -> Prepared:
        """The request's shared prefix is what all its pairs start with: found again over every slice's
        pairs (one slice's documents may share first words the others do not)."""
        merged = concat_prepared(parts, context=None, tokens=self.metered_tokens(parts))
        shared = common_prefix_length(merged.ids, merged.lengths)
        merged.context = SharedPrefix(merged.ids[:shared]) if shared > 1 else None
        merged.shared = shared if merged.context is not None else 0
        return merged

    # -- per batch --------------------------------------------------------------------------------------
    def collate(self, rows: Rows) -> Batch:
        if not self.share_prefix:
            return super().collate(rows)
        by_prefix: dict[SharedPrefix, list[int]] = {}
        plain: list[int] = []
        for row, ctx in enumerate(rows.contexts):
            (by_prefix.setdefault(ctx, []) if isinstance(ctx, SharedPrefix) else plain).append(row)
        offsets = offsets_of(rows.lengths)
        groups: list[PrefixGroup] = []
        for prefix, members in by_prefix.items():
            if len(members) == 1 and prefix not in self.prefixes:
                plain += members  # nothing to share: one pair runs whole
                continue
            at = np.asarray(members)
            skip = len(prefix.ids)
            tail_lengths = rows.lengths[at] - skip
            tails = rows.ids[gather_index(offsets[at] + skip, tail_lengths)]
            width = int(tail_lengths.max())
            ids = torch.full((len(members), width), self.pad_id, dtype=torch.long)
            ids.numpy()[padded_mask(tail_lengths, width, left=False)] = tails
            groups.append(PrefixGroup(
                prefix=prefix, rows=to_device(torch.from_numpy(at.astype(np.int64)), self.device), input_ids=to_device(ids, self.device),
                lengths=to_device(torch.from_numpy(tail_lengths.astype(np.int64)), self.device),
            ))
        if not groups:
            return super().collate(rows)
        plain.sort()
        inputs = self.padded_inputs(_subset(rows, plain, offsets)) if plain else {}
        plain_rows = to_device(torch.tensor(plain, dtype=torch.long), self.device) if plain else None
        return PrefixBatch(inputs=inputs, contexts=rows.contexts, size=len(rows), groups=groups, plain_rows=plain_rows)

    def forward(self, batch: Batch) -> torch.Tensor:
        if not isinstance(batch, PrefixBatch):
            return self._forward_whole(batch.inputs)
        out = torch.empty(batch.size, dtype=torch.float32, device=self.device)
        for group in batch.groups:
            out[group.rows] = self._forward_after_prefix(group)
        if batch.plain_rows is not None:
            out[batch.plain_rows] = self._forward_whole(batch.inputs)
        return out

    def _forward_whole(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # The decoder body only: lm_head (hidden -> vocabulary) is never called.
        hidden = self.model.model(**inputs, use_cache=False, return_dict=True).last_hidden_state
        last = hidden[:, -1]  # left padding: every row's last real token
        return last.float() @ self.yes_no

    def _forward_after_prefix(self, group: PrefixGroup) -> torch.Tensor:
        """The group's own tokens against the prefix's cached keys and values. Rows are right-padded, so
        their real tokens sit at positions len(prefix) + 0.. with no gap, exactly where they sit in the
        whole sequence; the score is read at each row's last real token."""
        from transformers.cache_utils import Cache

        kv = self.prefixes.get_or_compute(group.prefix, self._prefix_kv)
        n, width = group.input_ids.shape
        layer = _shared_prefix_layer()
        cache = Cache(layers=[layer(k, v) for k, v in kv])
        mask = torch.ones((n, len(group.prefix.ids) + width), dtype=torch.long, device=self.device)
        mask[:, len(group.prefix.ids):] = torch.arange(width, device=self.device) < group.lengths[:, None]
        hidden = self.model.model(
            input_ids=group.input_ids, attention_mask=mask, past_key_values=cache, use_cache=True, return_dict=True
        ).last_hidden_state
        last = hidden[torch.arange(n, device=self.device), group.lengths - 1]
        return last.float() @ self.yes_no

    def _prefix_kv(self, prefix: SharedPrefix) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Pinned and without blocking, as every batch's input (to_device): a blocking copy would wait for the
        # other inference thread's batch on the shared stream.
        ids = to_device(torch.tensor([prefix.ids], dtype=torch.long), self.device)
        cache = self.model.model(input_ids=ids, use_cache=True, return_dict=True).past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def synthetic_rows(self, lengths: list[int]) -> Rows:
        ids, lens = flatten([(self.prefix_ids + [self.yes_id] * k)[:k] for k in lengths])
        return Rows(ids, lens, None, [None] * len(lengths))


def prefix_row_share(config: Any) -> float:
    """What one prefix token costs each row of a prefix group, in tokens of the budget. The group's rows run
    only their own tokens, but each layer joins the prefix's keys and values to every row's
    (_shared_prefix_layer) and, with a mask, transformers' SDPA repeats them to every query head: per row and
    prefix token, 2 x (key/value heads + query heads) x head_dim values. A token of the row's own costs at
    least its hidden state and the MLP's gate, up and their product: hidden + 3 x intermediate values (on
    Qwen3-4B 31,744, against the 79.3 KB/token bench/memory.py measured at bf16: 40,600 values; the lower
    figure makes the share the larger, so batches the smaller). Qwen3-4B: 10,240 / 31,744 = 0.32. Counted as
    the prefix's tokens of every row, a group with a long query over short documents fits its memory as a
    plain batch of the same cost does."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads  # a config without grouped-query attention
    joined = 2 * (kv_heads + heads) * head_dim
    return joined / (config.hidden_size + 3 * config.intermediate_size)


@functools.cache
def _shared_prefix_layer() -> type:
    """A cache layer holding a prefix's keys and values, [1, heads, prefix, dim], that joins each forward's
    own to them for that layer's attention and keeps nothing: a kept cache (transformers' DynamicLayer) holds
    every layer's [pairs, heads, prefix + width, dim] to the end of the forward, 36 layers on Qwen3-4B, more
    memory than the batch's activations and none of it measured by the warm-up. (Defined on first use:
    transformers is imported lazily.)"""
    from transformers.cache_utils import DynamicLayer

    class SharedPrefixLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
            n = key_states.shape[0]
            return (
                torch.cat([self.keys.expand(n, -1, -1, -1), key_states], dim=-2),
                torch.cat([self.values.expand(n, -1, -1, -1), value_states], dim=-2),
            )

    return SharedPrefixLayer


def _subset(rows: Rows, which: list[int], offsets: np.ndarray) -> Rows:
    at = np.asarray(which)
    lengths = rows.lengths[at]
    return Rows(rows.ids[gather_index(offsets[at], lengths)], lengths, None, [rows.contexts[k] for k in which])
