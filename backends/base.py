"""The interface between the batching engine and a model.

A backend knows how to turn (query, documents) into token sequences and how to score a padded batch of
them. It knows nothing of requests, queues or HTTP: the engine (the `engine` package) owns batching, memory
budgets, OOM recovery and top-k.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from backends.runtimes import may_export, start_runtime
from core.config import Effective, ModelSpec
from core.host import CPU_STREAMS, cpu_has_fast_bf16, cpu_stream_split

# Longest characters-per-token ratio we expect from any tokenizer we serve. Documents are cut at
# max_length * this many characters before tokenizing, so a multi-megabyte document costs the tokenizer
# microseconds instead of seconds; everything past the cut would be truncated away anyway.
MAX_CHARS_PER_TOKEN = 32


@dataclass(slots=True)
class Encoded:
    """One scored unit: a (query, document-or-chunk) pair as token ids."""

    # Lists from the tokenizer; the engine stores queued ones as int32 / int8 numpy views (engine.work).
    input_ids: Sequence[int]
    token_type_ids: Sequence[int] | None = None


@dataclass(slots=True)
class Prepared:
    """A request after tokenization: what the engine queues."""

    items: list[Encoded]
    # items[i] scores document doc_index[i]; several items per document when it was split into chunks.
    doc_index: list[int]
    n_docs: int
    # Per-request data the forward pass needs besides the items (e.g. a bi-encoder's query vector).
    context: Any = None
    # Real (unpadded) tokens, for usage metering.
    tokens: int = 0
    # Documents cut to fit (max_length, max_chunks_per_doc, max_tokens_per_doc): part of their text was
    # not scored. A request with truncation off is refused when there is one.
    cut_docs: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    contexts: list[Any] = field(default_factory=list)


class Backend(abc.ABC):
    """Base class. Subclasses set `tokenizer`, `encoder` (a backends.request_encoder.RequestEncoder, which
    `prepare` tokenizes with: it is safe on several threads at once), `model`, `pad_id` and implement `load`,
    `prepare`, `forward`."""

    padding_side: Literal["left", "right"] = "right"
    # True when batches are packed without padding (backends.varlen): a batch then costs its real tokens,
    # and that is what its token budget should count.
    padding_free: bool = False
    # How raw model outputs map to a relevance score in [0, 1].
    score_transform: Literal["sigmoid", "cosine"] = "sigmoid"

    def __init__(self, name: str, spec: ModelSpec, eff: Effective) -> None:
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
        request's slices on several threads). Pairs are independent of each other, so this concatenates;
        a backend with a per-request context overrides it, since the slices each made their own."""
        if any(p.context is not None for p in parts):
            raise NotImplementedError(f"backend {type(self).__name__} must merge its per-request contexts")
        return concat_prepared(parts, context=None, tokens=sum(p.tokens for p in parts))

    # -- per batch (runs in the engine's inference thread) ---------------------------------------------
    def collate(self, items: list[Encoded], contexts: list[Any]) -> Batch:
        """Pad a batch. On a GPU the host tensors are pinned and copied with non_blocking, so the copy
        runs on the engine's CUDA stream without stalling the host (the allocator keeps a pinned block
        until its copy has run)."""
        width = max(len(it.input_ids) for it in items)
        n = len(items)
        pinned = self.device.type == "cuda"
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, pin_memory=pinned)
        mask = torch.zeros((n, width), dtype=torch.long, pin_memory=pinned)
        with_types = items[0].token_type_ids is not None
        types = torch.zeros((n, width), dtype=torch.long, pin_memory=pinned) if with_types else None
        # Filled through numpy views: ids may be lists or the engine's compact int32 arrays.
        ids_np, mask_np = ids.numpy(), mask.numpy()
        types_np = types.numpy() if types is not None else None
        for row, it in enumerate(items):
            k = len(it.input_ids)
            sl = slice(width - k, width) if self.padding_side == "left" else slice(0, k)
            ids_np[row, sl] = it.input_ids
            mask_np[row, sl] = 1
            if types_np is not None and it.token_type_ids is not None:
                types_np[row, sl] = it.token_type_ids
        inputs = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            inputs["token_type_ids"] = types
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        return Batch(inputs=inputs, contexts=contexts)

    def batch_cost(self, items: list[Encoded], contexts: list[Any]) -> int:
        """Tokens a batch of these pairs costs against the token budget: longest x count for a padded
        batch. Backends that pack (padding-free) or share a prefix cost less; the engine's batch builder
        can ask this instead of assuming longest x count."""
        return max(len(it.input_ids) for it in items) * len(items)

    @abc.abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Raw scores, float32, shape [n], on self.device. Called under torch.inference_mode()."""

    def relevance(self, raw: torch.Tensor) -> torch.Tensor:
        if self.score_transform == "cosine":
            return ((raw + 1.0) / 2.0).clamp(0.0, 1.0)
        return torch.sigmoid(raw)

    def synthetic_item(self, length: int) -> Encoded:
        """A pair of exactly `length` tokens, for warm-up batches."""
        return Encoded(input_ids=[self.pad_id + 3] * length)

    def synthetic_context(self) -> Any:
        """The per-request context a warm-up pair is scored with (None for cross-encoders)."""
        return None


def concat_prepared(parts: list[Prepared], *, context: Any, tokens: int) -> Prepared:
    """The items of consecutive document slices in order, their document indices moved to the whole
    request's."""
    items: list[Encoded] = []
    doc_index: list[int] = []
    cut_docs: list[int] = []
    offset = 0
    for part in parts:
        items += part.items
        doc_index += [offset + d for d in part.doc_index]
        cut_docs += [offset + d for d in part.cut_docs]
        offset += part.n_docs
    return Prepared(items=items, doc_index=doc_index, n_docs=offset, context=context, tokens=tokens, cut_docs=cut_docs)


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
