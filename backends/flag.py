"""`flag`: Hugging Face sequence-classification cross-encoders (bge-reranker-large and friends), scored as
FlagEmbedding's FlagReranker scores them.

FlagReranker's own loading is AutoTokenizer + AutoModelForSequenceClassification on the model path; its
tokenization is the pair format with only the document truncated after the query is cut to 3/4 of
max_length (backends.request_encoder.pair_items). We do the same steps directly rather than import FlagEmbedding at
serve time: that would pull datasets, peft and pandas into the server, and load the weights in float32
before casting (twice the host memory). tests/test_backends.py holds the scores equal to FlagReranker's.
"""

from __future__ import annotations

import torch

from backends import varlen
from backends.base import Backend, Batch, Prepared, Rows
from backends.request_encoder import RequestEncoder, pair_items
from backends.source import resolve_source


class Logits(torch.nn.Module):
    """A sequence classifier's one-label logit per pair, float32: the scoring module of cross-encoders."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs, return_dict=True).logits.view(-1).float()


class FlagBackend(Backend):
    score_transform = "sigmoid"
    exportable = True

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_source(self.spec.source)
        trust = self.spec.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        self.encoder = RequestEncoder(self.tokenizer)
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust, dtype=self.load_dtype)
        # Batching, precision and placement are the engine's: float16 on GPUs unless the profile says otherwise.
        self.model = model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        self.start()

    def start(self) -> None:
        """After the weights are loaded: padding-free batches where asked for and possible (`auto`: where a
        varlen kernel runs; packed attention pair by pair would be slower than padding), else the runtime
        the registry picks (exported runtimes take padded batches)."""
        wanted = self.spec.padding_free
        if wanted == "on" or (wanted == "auto" and varlen.kernel_runs(self.device, self.dtype)):
            if varlen.supports(self.model) and self.spec.runtime in ("auto", "torch") and self.eff.quantization != "int8":
                varlen.enable(self.model)
                self.is_padded = False
                self.model = self.model.to(self.dtype)  # load_dtype may have read float32 for an export
                self.runtime = None
                return
            if wanted == "on":
                raise RuntimeError(
                    f"padding_free: on needs a {'/'.join(varlen.SUPPORTED_MODEL_TYPES)} model on the torch runtime"
                )
        self.start_runtime()

    def prepare(self, query, documents, *, max_length, max_chunks, instruction, max_doc_tokens=None) -> Prepared:
        return pair_items(
            self.encoder, self.tokenizer, query, documents,
            max_length=max_length, max_chunks=max_chunks, query_max_length=max_length * 3 // 4,
            max_doc_tokens=max_doc_tokens,
        )

    def scoring_module(self) -> torch.nn.Module:
        return Logits(self.model).eval()

    def collate(self, rows: Rows) -> Batch:
        if self.is_padded:
            return super().collate(rows)
        return Batch(inputs=varlen.pack(rows, varlen.position_offset(self.model), self.device), contexts=rows.contexts)

    def forward(self, batch: Batch) -> torch.Tensor:
        if not self.is_padded:
            return varlen.packed_logits(self.model, batch.inputs)
        return self.runtime(batch.inputs)
