"""The HTTP edge: requests in, answers out, in the caller's dialect.

- `app`: the composition root: builds the Litestar app for a registry (routes, API-key middleware,
  dependencies, the lifespan that builds what handlers use).
- `rerank_routes`: the rerank routes of every dialect (Cohere v1/v2 and Jina, Voyage, TEI, the bare /rerank).
- `tenant_routes`: a tenant's models, usage and route reports; `operator_routes`: reload, every tenant's
  usage, health, readiness, metrics.
- `http_errors`: error responses in the route's dialect, and the OpenAPI description of them.
- `strict_json`: strict body decoding; `schemas`: the typed bodies of the gateway's own routes.
"""
