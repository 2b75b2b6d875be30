"""`flag`: Hugging Face sequence-classification cross-encoders (bge-reranker-large and friends), loaded
through FlagEmbedding's FlagReranker so a model dir that works there works here."""

from __future__ import annotations

import torch

from backends.base import Backend, Batch, Prepared, pair_items, resolve_source


class FlagBackend(Backend):
    score_transform = "sigmoid"

    def load(self) -> None:
        from FlagEmbedding import FlagReranker

        reranker = FlagReranker(
            resolve_source(self.spec.source),
            use_fp16=False,
            devices=[str(self.device)],
            max_length=self.eff.max_length,
            trust_remote_code=self.spec.trust_remote_code,
        )
        # FlagReranker only does the loading; batching, precision and placement are the engine's.
        self.tokenizer = reranker.tokenizer
        self.model = reranker.model.to(self.device, self.dtype).eval()
        self.pad_id = self.tokenizer.pad_token_id
        self.query_max_length = self.eff.max_length * 3 // 4

    def prepare(self, query, documents, *, max_length, max_chunks, instruction) -> Prepared:
        return pair_items(
            self.tokenizer, query, documents,
            max_length=max_length, max_chunks=max_chunks, query_max_length=min(self.query_max_length, max_length * 3 // 4),
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        logits = self.model(**batch.inputs, return_dict=True).logits
        return logits.view(-1).float()
