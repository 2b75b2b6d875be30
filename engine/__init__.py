"""The batching engine: one Scheduler per loaded model.

Layers: core <- backends <- engine <- gateway. The engine knows backends (how to tokenize and score a
padded batch) and nothing of HTTP; it raises the typed errors of `core.errors`.

One module, one job:
- `work`: a request inside the engine (Work), a queued pair (Slot), the answer (Completed), compact ids.
- `admission`: cost estimates before tokenizing and the queue limits (429 before work).
- `lanes`: bounded tokenizer lanes, so a small search never waits behind a bulk tokenization.
- `fair_queue`: start-time fair queueing across tenants, and across requests inside a tenant.
- `batching`: one batch from the window of queued pairs (length runs, small requests kept whole).
- `device`: GPU hygiene in one place: the per-scheduler CUDA stream, pinned copies, event timing, syncs
  and the device gate under which a model's own peak memory is measured.
- `inference`: one batch end to end (collate, forward with the OOM policy, sync, scatter, top-k, metrics).
- `streams`: the inference threads, their failure boundary and the supervisor that restarts them.
- `pooling`: chunk pooling (a document scores as its best chunk) and on-device top-k.
- `warmup`: the warm-up that proves the token budget on the path production takes.
- `scheduler`: the facade the gateway uses.
"""

from engine.scheduler import Scheduler
from engine.work import Completed

__all__ = ["Completed", "Scheduler"]
