"""The model pool: which models exist, their state, and what answers each one's requests.

- `model_pool`: `ModelPool` and its `ModelEntry`s: loading off the event loop, warm-up, budgets, state.
- `local_runner`: a loaded model's runner: tokenize, queue in its engine Scheduler, score, top-k.
- `remote_runner`: a `backend: remote` model's runner: calls to upstream rerank services, split and merged.
- `upstream_endpoints`: the endpoints behind a remote model: least outstanding requests, ejection, probes.
"""
