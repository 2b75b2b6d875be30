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
"""

from __future__ import annotations

import torch

from backends.base import Backend, Batch, Encoded, Prepared, cuda_has_native_bf16, cut_text, resolve_source

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def pair_text(instruction: str, query: str, document: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


class Qwen3Backend(Backend):
    padding_side = "left"
    score_transform = "sigmoid"

    def __init__(self, name, spec, eff) -> None:
        super().__init__(name, spec, eff)
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

        self.yes_id, self.no_id = (self._single_token(w) for w in ("yes", "no"))
        weight = model.get_output_embeddings().weight  # lm_head; kept in 16-bit by bitsandbytes
        # The 1-row classifier: logit_yes - logit_no = h . (W[yes] - W[no]), in float32.
        self.yes_no = (weight[self.yes_id].float() - weight[self.no_id].float()).to(self.device)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.prefix_ids = self.tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
        self.suffix_ids = self.tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]

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
        tok = self.tokenizer
        instruction = instruction or self.spec.instruction or DEFAULT_INSTRUCTION
        budget = max(1, max_length - len(self.prefix_ids) - len(self.suffix_ids))
        # split_special_tokens: "<|im_end|>" inside user text stays plain text, so a document cannot close
        # the user turn and answer "yes" for the model.
        text_kw = {"add_special_tokens": False, "split_special_tokens": True}
        q_ids = tok(cut_text(query, budget), **text_kw)["input_ids"]
        if len(q_ids) > budget * 3 // 4:
            query = tok.decode(q_ids[: budget * 3 // 4])
        items: list[Encoded] = []
        doc_index: list[int] = []
        # The template's fixed part before the document: instruction, query and "<Document>:".
        head = tok(pair_text(instruction, query, "")[:-1], **text_kw)["input_ids"]
        if max_doc_tokens is not None:
            budget = min(budget, len(head) + max_doc_tokens)
        if max_chunks <= 1:
            texts = [pair_text(instruction, query, cut_text(d, budget)) for d in documents]
            enc = tok(texts, truncation=True, max_length=budget, **text_kw)["input_ids"]
            for k, middle in enumerate(enc):
                items.append(Encoded(self.prefix_ids + middle + self.suffix_ids))
                doc_index.append(k)
        else:
            # Chunks: the instruction and query head every window of the document. The head ends at
            # "<Document>:" and each document starts with its space, which is where the byte-level
            # pre-tokenizer splits anyway, so a one-chunk document tokenizes as the whole text would.
            window = max(1, budget - len(head))
            docs = tok([" " + cut_text(d, window * max_chunks) for d in documents], **text_kw)["input_ids"]
            for k, ids in enumerate(docs):
                for start in range(0, max(len(ids), 1), window)[:max_chunks]:
                    items.append(Encoded(self.prefix_ids + head + ids[start : start + window] + self.suffix_ids))
                    doc_index.append(k)
        return Prepared(items=items, doc_index=doc_index, n_docs=len(documents), tokens=sum(len(i.input_ids) for i in items))

    # -- per batch --------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> torch.Tensor:
        # The decoder body only: lm_head (hidden -> vocabulary) is never called.
        hidden = self.model.model(**batch.inputs, use_cache=False, return_dict=True).last_hidden_state
        last = hidden[:, -1]  # left padding: every row's last real token
        return last.float() @ self.yes_no

    def synthetic_item(self, length: int) -> Encoded:
        return Encoded(input_ids=(self.prefix_ids + [self.yes_id] * length)[:length])
