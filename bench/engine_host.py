"""The engine's host work per pair at GPU-sized batches, with the model's forward taken out.

On a fast GPU a 1,000-document request's forward takes ~0.1 s; whatever the engine does on the host per
pair and per batch (queueing, window, batch building, collation, scatter, pooling, top-k) must stay well
under that. This measures exactly that work: the real tiny cross-encoder's backend and tokenizer, a real
Scheduler with its inference threads, but a forward that returns zeros at once (labelled as such: it is a
benchmark of the host path, not of a model). Requests are tokenized first (`Scheduler.prepare`), so
tokenizing is out of the figure too; only `submit` -> answer is timed.

Two workloads: `--requests` requests of `--docs` documents submitted at once (default: 8 x 1,000), or with
`--clients N` N closed-loop clients each sending `--requests` requests of `--docs` documents one after another
(16 x 20 documents: what a search costs the engine's host work, which holds the GIL on a GPU host).

Run it against this checkout and another one, side by side:

    python -m bench.engine_host                                # this checkout
    python -m bench.engine_host --budgets 16384 --clients 16 --requests 60 --docs 20
    PYTHONPATH=/tmp/old python bench/engine_host.py            # another commit's engine (git worktree add /tmp/old REV;
                                                               # run this checkout's first, which builds the model)

It prints pairs/s of engine host work and process CPU-ms per 1,000 pairs, at the budgets given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from backends.flag import FlagBackend


class FreeForward(FlagBackend):
    """The flag backend with its model call taken out: scores are zeros, produced at once."""

    def forward(self, batch) -> torch.Tensor:
        return torch.zeros(batch.inputs["input_ids"].shape[0] if self.is_padded_batch(batch) else len(batch.inputs["cu_seq_lens"]) - 1)

    @staticmethod
    def is_padded_batch(batch) -> bool:
        return "cu_seq_lens" not in batch.inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="16384,65536")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=0, help="closed-loop clients, --requests each (0: --requests at once)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from core.config import model_spec as make_spec
    except ImportError:  # before the registry's tagged union
        from core.config import ModelSpec as make_spec
    from core.config import effective
    from engine import Scheduler
    from bench.workload import big_request, small_requests, vocabulary

    model_dir = Path(os.environ.get("ENGINE_HOST_WORK", "/tmp/engine-host")) / "tiny-ce"
    if not (model_dir / "config.json").exists():
        from tests.tiny_models import build_minilm_tiny_cross_encoder

        build_minilm_tiny_cross_encoder(model_dir)
    spec = make_spec(backend="flag", source=str(model_dir), max_length=512, runtime="torch", dtype="float32")
    backend = FreeForward("free", spec, effective(spec, "cpu"))
    backend.load()
    words = vocabulary(model_dir)
    # Requests submitted at once are as many clients of one request each.
    clients = args.clients or args.requests
    reqs = small_requests(words, clients * args.requests, args.docs) if args.clients else [big_request(words, args.docs)] * args.requests
    kwargs = dict(max_length=512, max_chunks=1, instruction=None)
    root = Path(sys.modules["engine"].__file__).resolve().parent.parent
    shape = f"{args.clients} closed-loop clients x {args.requests} requests" if args.clients else f"{args.requests} concurrent requests"
    print(f"engine from {root}; forward taken out; {shape} of {args.docs} documents")
    for budget in [int(b) for b in args.budgets.split(",")]:
        sched = Scheduler(backend, max_batch_tokens=budget, max_batch_size=max(256, budget // 32), max_queue_pairs=10**7, max_queue_tokens=10**10)

        async def go() -> tuple[float, float]:
            prepared = [await sched.prepare(r.query, r.documents, **kwargs) for r in reqs]

            async def client(k: int) -> None:
                for p in prepared[k::clients]:
                    await sched.submit(p, top_n=10)

            start, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(client(k) for k in range(clients)))
            return time.perf_counter() - start, time.process_time() - cpu

        try:
            asyncio.run(go())  # warm
            runs = [asyncio.run(go()) for _ in range(args.rounds)]
        finally:
            sched.close()
        pairs = len(reqs) * args.docs
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"budget {budget:>6}: {pairs / wall:9.0f} pairs/s of host work, {cpu / pairs * 1e6:7.0f} CPU-us per pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
