"""Tokenizing requests on several threads at once.

A transformers tokenizer keeps its truncation and padding settings inside the Rust tokenizer it wraps, and
every call rewrites them before it encodes. Two threads tokenizing for one model (the slices of a big
request, a search beside them, a query encoded whole while pairs are cut at max_length, another request's
max_tokens_per_doc) can therefore each encode under the other's settings: two threads alternating
max_length 128 and 40 got a pair cut at the wrong length once in 6,000 calls (3,000 each) here. A
RequestEncoder owns a clone of the Rust tokenizer whose settings never change after it is made (no
truncation, no padding) and cuts sequences itself, so any number of threads can use it at once.
"""

from __future__ import annotations

from typing import Any, Callable

from tokenizers import Encoding, Tokenizer

from backends.base import Encoded, Prepared, cut_text


class RequestEncoder:
    def __init__(self, tokenizer: Any, *, split_special_tokens: bool = False) -> None:
        """tokenizer: a transformers fast tokenizer. split_special_tokens: special-token text inside user
        text is encoded as plain text (a document cannot write `<|im_end|>`)."""
        core = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        core.no_truncation()
        core.no_padding()
        core.encode_special_tokens = split_special_tokens
        self._core = core
        # Token type ids only where the model takes them (BERT does, XLM-R does not), as transformers returns.
        self._with_types = "token_type_ids" in tokenizer.model_input_names
        processor = core.post_processor
        self.special_single = processor.num_special_tokens_to_add(False) if processor is not None else 0
        self.special_pair = processor.num_special_tokens_to_add(True) if processor is not None else 0

    def encode(self, texts: list[str]) -> list[Encoding]:
        """Each text's tokens, without special tokens and uncut."""
        return self._core.encode_batch(texts, add_special_tokens=False)

    def ids(self, text: str) -> list[int]:
        return self._core.encode(text, add_special_tokens=False).ids

    @staticmethod
    def windows(encoding: Encoding, size: int, limit: int) -> tuple[list[Encoding], bool]:
        """The encoding cut into consecutive windows of `size` tokens (the last may be shorter; an empty
        text is one empty window), at most `limit` of them: what a transformers call with truncation,
        stride 0 and return_overflowing_tokens makes of a sequence. And whether tokens were left over."""
        encoding.truncate(max(size, 1), 0, "right")
        windows = [encoding, *encoding.overflowing]
        return windows[: max(limit, 1)], len(windows) > max(limit, 1)

    def documents(
        self, documents: list[str], *, room: int, max_chunks: int, text_tokens: int, build: Callable[[Encoding], Encoded]
    ) -> tuple[list[Encoded], list[int], list[int]]:
        """Each document (its text first cut to text_tokens tokens' worth of characters) in windows of `room`
        tokens, at most max_chunks, each made an item by `build`. Returns the items, the document index of
        each, and the documents cut to fit (text or tokens left over)."""
        texts = [cut_text(d, text_tokens) for d in documents]
        items: list[Encoded] = []
        doc_index: list[int] = []
        cut_docs: list[int] = []
        for k, encoding in enumerate(self.encode(texts)):
            windows, left_over = self.windows(encoding, room, max_chunks)
            for window in windows:
                items.append(build(window))
                doc_index.append(k)
            if left_over or len(texts[k]) < len(documents[k]):
                cut_docs.append(k)
        return items, doc_index, cut_docs

    def single(self, encoding: Encoding) -> Encoded:
        """One sequence with the model's special tokens."""
        return self._encoded(self._core.post_process(encoding, None, True))

    def pair(self, first: Encoding, second: Encoding) -> Encoded:
        """A pair with the model's special tokens (and token type ids where the model takes them)."""
        return self._encoded(self._core.post_process(first, second, True))

    def _encoded(self, encoding: Encoding) -> Encoded:
        return Encoded(input_ids=encoding.ids, token_type_ids=encoding.type_ids if self._with_types else None)


def pair_items(
    encoder: RequestEncoder,
    tokenizer: Any,
    query: str,
    documents: list[str],
    *,
    max_length: int,
    max_chunks: int,
    query_max_length: int,
    max_doc_tokens: int | None = None,
) -> Prepared:
    """Cross-encoder input: `[CLS] query [SEP] doc [SEP]` per pair, truncating only the document.

    The query is cut to query_max_length tokens first (as FlagReranker does: decoded, then encoded again
    with each pair), so a long query cannot squeeze the document out. With max_chunks > 1 a long document
    becomes up to max_chunks windows, each paired with the whole query; the engine scores a document by its
    best chunk. `tokenizer` (the transformers one) only decodes the cut query.
    """
    first = encoder.encode([query])[0]
    query_tokens = len(first.ids)
    if query_tokens > query_max_length:
        first = encoder.encode([tokenizer.decode(first.ids[:query_max_length])])[0]
        query_tokens = query_max_length
    if max_doc_tokens is not None:
        max_length = min(max_length, query_tokens + encoder.special_pair + max_doc_tokens)
    items, doc_index, cut_docs = encoder.documents(
        documents,
        room=max_length - len(first.ids) - encoder.special_pair,
        max_chunks=max_chunks,
        text_tokens=max_length * max_chunks,
        build=lambda window: encoder.pair(first, window),
    )
    tokens = sum(len(i.input_ids) for i in items)
    return Prepared(items=items, doc_index=doc_index, n_docs=len(documents), tokens=tokens, cut_docs=cut_docs)
