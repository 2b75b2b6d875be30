"""The wire formats, one module per API dialect, each written once for serving and for calling upstreams.

- `cohere`: Cohere's /v1/rerank and /v2/rerank (Jina's and vLLM's share the request).
- `voyage`: Voyage AI's /v1/rerank.
- `tei`: Hugging Face text-embeddings-inference's /rerank, with its own error types and statuses.
- `upstream`: the dialects a `backend: remote` model calls, built from the modules above.
Each maps its request onto `core.rerank.RerankRequest` (`to_internal`) and a `RerankResult` back
(`to_response`), and says how it writes an error (`ERRORS`). No HTTP framework here beyond those shapes.
"""
