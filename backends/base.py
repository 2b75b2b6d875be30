"""The interface between the batching engine and a model.

A backend knows how to turn (query, documents) into token sequences and how to score a padded batch of
them. It knows nothing of requests, queues or HTTP: the engine (the `engine` package) owns batching, memory
budgets, OOM recovery and top-k.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from backends import device_mask
from backends.runtimes import may_export, start_runtime
from backends.token_arrays import flatten, gather_index, offsets_of, padded_mask
from core.config import Effective, LocalModelSpec
from core.host import CPU_STREAMS, cpu_has_fast_bf16, cpu_stream_split

# Longest characters-per-token ratio we expect from any tokenizer we serve. Documents are cut at
# max_length * this many characters before tokenizing, so a multi-megabyte document costs the tokenizer
# microseconds instead of seconds; everything past the cut would be truncated away anyway.
MAX_CHARS_PER_TOKEN = 32


@dataclass(slots=True, eq=False)
class Prepared:
    """A request (or a slice of its documents) after tokenization: what the engine queues. Its pairs are
    flat arrays (backends.token_arrays), never a Python object per pair."""

    ids: np.ndarray  # int32: every pair's tokens, end to end
    lengths: np.ndarray  # int32: tokens of each pair
    # Pair i scores document doc_index[i]; several pairs per document when it was split into chunks.
    doc_index: np.ndarray  # int32
    n_docs: int
    types: np.ndarray | None = None  # int8 token type ids laid out as `ids`, where the model takes them
    # Per-request data the forward pass needs besides the pairs (e.g. a bi-encoder's query, a shared prefix).
    context: Any = None
    # Real (unpadded) tokens, for usage metering.
    tokens: int = 0
    # Documents cut to fit (max_length, max_chunks_per_doc, max_tokens_per_doc): part of their text was
    # not scored. A request with truncation off is refused when there is one.
    cut_docs: list[int] = field(default_factory=list)
    # Leading tokens every pair shares, which the backend runs once per batch group (Qwen3's system prompt,
    # instruction and query): a batch of the request costs them once. 0 for cross-encoders.
    shared: int = 0
    offsets: np.ndarray = field(init=False)  # int64, n_items + 1: pair i is ids[offsets[i]:offsets[i + 1]]

    def __post_init__(self) -> None:
        self.offsets = offsets_of(self.lengths)

    @property
    def n_items(self) -> int:
        return len(self.lengths)

    def pair(self, i: int) -> np.ndarray:
        """Pair i's token ids (a view)."""
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def pair_types(self, i: int) -> np.ndarray | None:
        return None if self.types is None else self.types[self.offsets[i] : self.offsets[i + 1]]

    def rows(self, items: np.ndarray | None = None) -> "Rows":
        """Some of its pairs (all by default) as the rows of a batch, in the given order."""
        if items is None:
            return Rows(self.ids, self.lengths, self.types, [self.context] * self.n_items)
        items = np.asarray(items, dtype=np.int64)
        lengths = self.lengths[items]
        at = gather_index(self.offsets[items], lengths)
        types = None if self.types is None else self.types[at]
        return Rows(self.ids[at], lengths, types, [self.context] * len(items))


def prepared(
    sequences: list, doc_index: list[int] | np.ndarray, n_docs: int, *, types: list | None = None, context: Any = None,
    tokens: int | None = None, cut_docs: list[int] | None = None,
) -> Prepared:
    """A Prepared from token sequences given as lists or arrays (tests, synthetic requests)."""
    ids, lengths = flatten(sequences)
    flat_types = flatten(types, np.int8)[0] if types is not None else None
    return Prepared(
        ids=ids, lengths=lengths, doc_index=np.asarray(doc_index, dtype=np.int32), n_docs=n_docs, types=flat_types,
        context=context, tokens=int(lengths.sum()) if tokens is None else tokens, cut_docs=list(cut_docs or []),
    )


@dataclass(slots=True)
class Rows:
    """The pairs of one batch, before collation: tokens end to end, their lengths, and each row's context."""

    ids: np.ndarray  # int32
    lengths: np.ndarray  # int32
    types: np.ndarray | None  # int8, or None
    contexts: list[Any]

    def __len__(self) -> int:
        return len(self.lengths)

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        if len(parts) == 1:
            return parts[0]
        with_types = parts[0].types is not None
        return Rows(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            np.concatenate([p.types for p in parts]) if with_types else None,
            [c for p in parts for c in p.contexts],
        )


@dataclass(slots=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    contexts: list[Any] = field(default_factory=list)


class Backend(abc.ABC):
    """Base class. Subclasses set `tokenizer`, `encoder` (a backends.request_encoder.RequestEncoder, which
    `prepare` tokenizes with: it is safe on several threads at once), `model`, `pad_id` and implement `load`,
    `prepare`, `forward`."""

    padding_side: Literal["left", "right"] = "right"
    # False when batches are packed without padding (backends.varlen): a batch then costs its real tokens
    # against the token budget, not longest x count. The engine's batch builder reads it (as TEI's queue does).
    is_padded: bool = True
    # What one token of a shared prefix (Prepared.shared) costs each row of its group, in tokens of the
    # budget: 0 where a backend runs no prefix once for many rows. The batch builder reads it with is_padded.
    prefix_row_share: float = 0.0
    # How raw model outputs map to a relevance score in [0, 1].
    score_transform: Literal["sigmoid", "cosine"] = "sigmoid"

    def __init__(self, name: str, spec: LocalModelSpec, eff: Effective) -> None:
        self.name = name
        self.spec = spec
        self.eff = eff
        self.device = torch.device(eff.device)
        self.dtype = resolve_dtype(eff.dtype, self.device)
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.encoder: Any = None
        self.pad_id = 0

    # -- lifecycle --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self) -> None:
        """Load weights onto self.device in self.dtype. Raise on failure; the caller records the reason."""

    # How the model call inside forward runs (backends.runtimes): torch, or an exported ONNX Runtime /
    # OpenVINO model. Chosen by start_runtime() at the end of load() from the registry's `runtime`.
    runtime: Any = None
    # True when scoring_module() can be exported to ONNX Runtime / OpenVINO (and so take `quantization:
    # int8`): the registry's EXPORTABLE_BACKENDS names the same kinds (a test holds them together).
    exportable: bool = False

    def scoring_module(self) -> torch.nn.Module:
        """What a runtime runs: a module taking the collated inputs as keyword tensors and returning the
        float32 raw outputs forward needs. Backends that can run on exported runtimes (`exportable`)
        override it."""
        raise NotImplementedError(f"backend {type(self).__name__} runs on torch only")

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype load() reads the weights in: the checkpoint's float32 when an exported runtime may
        be built from them (start_runtime casts the torch model to self.dtype afterwards), else self.dtype."""
        return torch.float32 if may_export(self) else self.dtype

    def start_runtime(self) -> None:
        if self.model is not None:
            device_mask.enable(self.model)  # no host read in a padded forward (backends.device_mask says why)
        self.runtime = start_runtime(self)

    def weights_bytes(self) -> int:
        if self.runtime is not None and self.runtime.weights_bytes is not None:
            return self.runtime.weights_bytes
        assert self.model is not None
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in self.model.buffers())
        return params + buffers

    # -- per request (runs in a worker thread) ----------------------------------------------------------
    @abc.abstractmethod
    def prepare(
        self,
        query: str,
        documents: list[str],
        *,
        max_length: int,
        max_chunks: int,
        instruction: str | None,
        max_doc_tokens: int | None = None,
    ) -> Prepared:
        """Tokenize. Documents longer than max_length are split into up to max_chunks chunks (the rest is
        truncated); max_chunks=1 means plain truncation. max_doc_tokens (Cohere's max_tokens_per_doc)
        caps the document tokens in each scored pair, below what max_length leaves."""

    def merge(self, parts: list[Prepared]) -> Prepared:
        """One request from the Prepared of consecutive slices of its documents (the engine tokenizes a big
        request's slices on several threads, and queues them merged where it queues a request whole:
        engine.scheduler.streams_slices). Pairs are independent of each other, so this concatenates; each
        slice's pairs are scored with the slice's own context."""
        return concat_prepared(parts, context=parts[0].context, tokens=self.metered_tokens(parts))

    def metered_tokens(self, parts: list[Prepared]) -> int:
        """The tokens a request tokenized in these slices is metered for (each slice's pairs count once)."""
        return sum(p.tokens for p in parts)

    # -- per batch (runs in the engine's inference thread) ---------------------------------------------
    def collate(self, rows: Rows) -> Batch:
        """Pad a batch. On a GPU the host tensors are pinned and copied with non_blocking, so the copy
        runs on the engine's CUDA stream without stalling the host (the allocator keeps a pinned block
        until its copy has run)."""
        return Batch(inputs=self.padded_inputs(rows), contexts=rows.contexts)

    def padded_width(self, longest: int) -> int:
        """How wide a padded batch whose longest pair has `longest` tokens is: rounded up to the runtime's
        width_multiple, never past max_length (the model's positions) unless the pair itself is."""
        step = self.runtime.width_multiple if self.runtime is not None else 1
        return max(longest, min(-(-longest // step) * step, self.spec.max_length))

    def padded_inputs(self, rows: Rows) -> dict[str, torch.Tensor]:
        n, width = len(rows), self.padded_width(int(rows.lengths.max()))
        pinned = self.device.type == "cuda"
        where = padded_mask(rows.lengths, width, left=self.padding_side == "left")
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, pin_memory=pinned)
        mask = torch.zeros((n, width), dtype=torch.long, pin_memory=pinned)
        ids.numpy()[where] = rows.ids
        mask.numpy()[where] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if rows.types is not None:
            types = torch.zeros((n, width), dtype=torch.long, pin_memory=pinned)
            types.numpy()[where] = rows.types
            inputs["token_type_ids"] = types
        return {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}

    @abc.abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Raw scores, float32, shape [n], on self.device. Called under torch.inference_mode()."""

    def relevance(self, raw: torch.Tensor) -> torch.Tensor:
        if self.score_transform == "cosine":
            return ((raw + 1.0) / 2.0).clamp(0.0, 1.0)
        return torch.sigmoid(raw)

    def synthetic_rows(self, lengths: list[int]) -> Rows:
        """Pairs of exactly these lengths, for warm-up batches."""
        ids, lens = flatten([[self.pad_id + 3] * k for k in lengths])
        return Rows(ids, lens, None, [None] * len(lengths))


def concat_prepared(parts: list[Prepared], *, context: Any, tokens: int) -> Prepared:
    """The pairs of consecutive document slices in order, their document indices moved to the whole
    request's."""
    if len(parts) == 1:
        return parts[0]
    doc_base = np.cumsum([0] + [p.n_docs for p in parts])
    with_types = parts[0].types is not None
    return Prepared(
        ids=np.concatenate([p.ids for p in parts]),
        lengths=np.concatenate([p.lengths for p in parts]),
        doc_index=np.concatenate([p.doc_index + base for p, base in zip(parts, doc_base)]).astype(np.int32),
        n_docs=int(doc_base[-1]),
        types=np.concatenate([p.types for p in parts]) if with_types else None,
        context=context,
        tokens=tokens,
        cut_docs=[int(base) + d for p, base in zip(parts, doc_base) for d in p.cut_docs],
        shared=min(p.shared for p in parts),
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """float16 on CUDA (bfloat16 only when asked for and supported), bfloat16 on CPUs with native bf16
    matmuls (AMX / AVX512-BF16), float32 otherwise. An explicit dtype wins."""
    if name == "bfloat16" and device.type == "cuda" and torch.cuda.is_available() and not cuda_has_native_bf16(device):
        # Pre-Ampere GPUs (T4, V100) emulate bf16 far slower than fp16: never run it there.
        return torch.float16
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device`. On a GPU through pinned memory, without blocking: a copy from pageable
    memory first waits for all the work queued on the stream, which is the batch the other inference thread
    has just launched there, and the two threads of a stream would no longer overlap."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def cuda_has_native_bf16(device: torch.device | None = None) -> bool:
    """bf16 tensor cores (compute capability 8.0+, Ampere on). torch.cuda.is_bf16_supported() also says
    yes where bf16 is only emulated, unless asked not to."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False)


def configure_cpu_streams(wanted: int = CPU_STREAMS) -> int:
    """Split this process's cores among `wanted` CPU inference streams: sets torch's intra-op threads
    (process-wide, so every CPU model shares the policy; threads started later pick it up) and returns
    the number of streams."""
    streams, threads = cpu_stream_split(wanted)
    torch.set_num_threads(threads)
    return streams


def cut_text(text: str, max_tokens: int) -> str:
    return text[: max_tokens * MAX_CHARS_PER_TOKEN]
