"""The dialects a `backend: remote` model can call, each built from the dialect module that also serves it,
so every wire shape is written once.

- cohere: Cohere v2 at {base}/v2/rerank (api.cohere.com, or any Cohere-compatible server).
- jina: {base}/v1/rerank, Cohere v1's request; the answer carries usage.total_tokens.
- vllm: vLLM's {base}/v1/rerank, Jina's shape.
- voyage: {base}/rerank where the base ends in /v1, as for Voyage's SDK.
- tei: {base}/rerank with `texts`; one model per server, no top_n, tokens in x-compute-tokens.
- gateway: another rerank-gateway's /v2/rerank, with the extensions it serves (raw_scores, instruction,
  chunking, priority, user), so a model behind a second gateway behaves as a local one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from dialects import cohere, tei, voyage
from core.rerank import RerankRequest, Scored


# What `dialect: gateway` adds to each call: the tenant the front door serves it for, and its weight (a
# rerank-gateway honours them from a tenant marked `forwards_tenants`, serving.pipeline).
TENANT_HEADER = "x-rerank-tenant"
TENANT_WEIGHT_HEADER = "x-rerank-tenant-weight"


@dataclass(frozen=True, slots=True)
class UpstreamDialect:
    name: str
    path: str
    max_documents_per_call: int
    body: Callable[[RerankRequest, list[str], str, int | None], dict[str, Any]]
    answer: Callable[[bytes, Any], Scored]
    error: Callable[[bytes], str]
    raw_scores: bool = False  # whether the upstream can return raw (unnormalised) scores
    top_n: bool = True  # whether the upstream cuts to top_n itself
    forwards_tenant: bool = False  # whether calls name the tenant (TENANT_HEADER)


def _gateway_body(req: RerankRequest, texts: list[str], model: str, top_n: int | None) -> dict[str, Any]:
    body = cohere.upstream_body(req, texts, model, top_n)
    extensions = {
        "raw_scores": req.raw_scores or None,
        "instruction": req.instruction,
        "max_chunks_per_doc": req.max_chunks_per_doc,
        "priority": req.priority or None,
        "user": req.user,
    }
    return body | {k: v for k, v in extensions.items() if v is not None}


_COHERE = dict(body=cohere.upstream_body, answer=cohere.upstream_answer, error=cohere.upstream_error)

DIALECTS: dict[str, UpstreamDialect] = {
    "cohere": UpstreamDialect("cohere", cohere.PATH_V2, cohere.MAX_DOCUMENTS_PER_CALL, **_COHERE),
    "jina": UpstreamDialect("jina", cohere.PATH_V1, cohere.MAX_DOCUMENTS_PER_CALL, **_COHERE),
    "vllm": UpstreamDialect("vllm", cohere.PATH_V1, cohere.MAX_DOCUMENTS_PER_CALL, **_COHERE),
    "voyage": UpstreamDialect(
        "voyage", voyage.PATH, voyage.MAX_DOCUMENTS, voyage.upstream_body, voyage.upstream_answer, voyage.upstream_error
    ),
    "tei": UpstreamDialect(
        "tei", tei.PATH, tei.MAX_DOCUMENTS_PER_CALL, tei.upstream_body, tei.upstream_answer, tei.upstream_error,
        raw_scores=True, top_n=False,
    ),
    "gateway": UpstreamDialect(
        "gateway", cohere.PATH_V2, 10_000, _gateway_body, cohere.upstream_answer, cohere.upstream_error,
        raw_scores=True, forwards_tenant=True,
    ),
}
