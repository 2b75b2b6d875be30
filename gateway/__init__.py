"""rerank-gateway: a self-hosted, Cohere-compatible rerank server."""

__version__ = "0.1.0"
