"""The batching engine: one Scheduler per loaded model.

Layers: core <- backends <- engine <- gateway. The engine knows backends (how to tokenize and score a
padded batch) and nothing of HTTP; it raises the typed errors of `core.errors`.

One module, one job:
- `work`: a request inside the engine (Work), arriving in slices of flat token arrays (Slice), and its
  answer (Completed).
- `admission`: cost estimates before tokenizing and the queue limits (429 before work).
- `lanes`: bounded tokenizer lanes, so a small search never waits behind a bulk tokenization; a big
  request is tokenized in slices on every bulk thread.
- `fair_queue`: start-time fair queueing across tenants, and across requests inside a tenant.
- `window`: the pulled pairs, a few batches deep, as columns of arrays.
- `batching`: one batch from the window (length runs, small requests kept whole), priced as the backend
  runs it (padded, packed, or prefix groups), as a Plan of request slices.
- `batch_time`: how long a batch holds the device (floor + tokens / rate), learnt from the batches run:
  what bounds bulk batches by time while searches arrive.
- `device`: GPU hygiene in one place: the per-scheduler CUDA stream, pinned copies, event timing, syncs
  and the device gate under which a model's own peak memory is measured.
- `inference`: one batch end to end (collate, forward with the OOM policy, sync, metrics, scatter, top-k);
  on a GPU two threads pipeline batches on one CUDA stream.
- `step_time`: a batch's wall and CPU time on its inference thread, step by step (build, collate, forward,
  ...), for /metrics.
- `streams`: the inference threads, their failure boundary and the supervisor that restarts them.
- `pooling`: chunk pooling (a document scores as its best chunk) and on-device top-k.
- `warmup`: the warm-up that proves the token budget on the path production takes, and the throughput
  ladder a GPU budget is chosen from.
- `scheduler`: the facade the pool's runners use.
"""

from engine.scheduler import Scheduler
from engine.work import Completed

__all__ = ["Completed", "Scheduler"]
