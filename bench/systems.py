"""The in-process systems the gateway is compared with, and the worker that runs one of them.

Each system runs in its own process (`python -m bench.systems SYSTEM MODEL_DIR`), so peak memory is its
own and the libraries' thread pools do not meet. The orchestrator (bench/rerank_bench.py) sends it one
JSON command per line on stdin and reads one JSON answer per line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from bench.models import CPU_BATCH_TOKENS
from bench.sorted_loop import length_runs, padded
from bench.workload import Request, big_request, small_requests, vocabulary

MAX_LENGTH = 512


class PaddingCounter:
    """Counts real and padded tokens of every forward pass of a model, from its attention mask.

    The hook sits on the encoder (`base_model`): sentence-transformers calls the classifier's `.forward`
    directly, which bypasses hooks on the classifier itself."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.real = 0
        self.padded = 0
        model.base_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is not None:
            self.real += int(mask.sum())
            self.padded += mask.numel()


class FlagSystem:
    """FlagEmbedding's FlagReranker.compute_score, fp32, as its README calls it."""

    label = "FlagReranker.compute_score (fp32)"

    def __init__(self, model_dir: str) -> None:
        from FlagEmbedding import FlagReranker

        self.reranker = FlagReranker(model_dir, use_fp16=False, devices=["cpu"], max_length=MAX_LENGTH)
        self.padding = PaddingCounter(self.reranker.model)

    def score(self, req: Request) -> list[float]:
        return list(self.reranker.compute_score([[req.query, d] for d in req.documents], normalize=True))


class CrossEncoderSystem:
    """sentence-transformers CrossEncoder.predict, fp32, defaults (batch_size 32, sigmoid)."""

    label = "CrossEncoder.predict (fp32)"

    def __init__(self, model_dir: str) -> None:
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(model_dir, device="cpu", max_length=MAX_LENGTH)
        self.padding = PaddingCounter(self.model[0].model)

    def score(self, req: Request) -> list[float]:
        return [float(s) for s in self.model.predict([(req.query, d) for d in req.documents], show_progress_bar=False)]


class CeilingSystem:
    """The ceiling: tokenize, sort by length, cut into batches under a padded-token budget and run them in
    the best dtype for this CPU, on the same CPU streams as the gateway (core.host.CPU_STREAMS
    single-threaded workers taking batches in turn). No queue, no HTTP, no scheduling."""

    def __init__(self, model_dir: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from backends.base import configure_cpu_streams, resolve_dtype

        self.dtype = resolve_dtype("auto", torch.device("cpu"))
        streams = configure_cpu_streams()
        self.pool = ThreadPoolExecutor(streams)
        self.label = (
            f"length-sorted token-budget loop ({str(self.dtype).removeprefix('torch.')}, "
            f"{streams} x {torch.get_num_threads()} threads, ceiling)"
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.dtype).eval()
        self.padding = PaddingCounter(self.model)

    def score(self, req: Request) -> list[float]:
        enc = self.tokenizer([req.query] * len(req.documents), req.documents, truncation="only_second", max_length=MAX_LENGTH)
        ids, types = enc["input_ids"], enc["token_type_ids"]
        batches = length_runs([len(x) for x in ids], CPU_BATCH_TOKENS)

        @torch.inference_mode()
        def forward(rows: list[int]) -> torch.Tensor:
            return self.model(**padded(ids, types, rows)).logits.view(-1).float()

        scores = torch.empty(len(ids))
        for rows, logits in zip(batches, self.pool.map(forward, batches)):
            scores[torch.tensor(rows)] = logits
        return torch.sigmoid(scores).tolist()


SYSTEMS = {"flag": FlagSystem, "crossencoder": CrossEncoderSystem, "ceiling": CeilingSystem}


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The process's resident-set high-water mark (VmHWM)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_big(system: Any, req: Request) -> dict:
    real, padded = system.padding.real, system.padding.padded
    start = time.perf_counter()
    scores = system.score(req)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "pairs": len(req.documents),
        "real_tokens": system.padding.real - real,
        "padded_tokens": system.padding.padded - padded,
        "scores": scores,
    }


def run_concurrent(system: Any, requests: list[Request], clients: int) -> dict:
    """A library in a process serves one call at a time: with `clients` closed-loop clients sending
    requests round-robin, request i is sent when request i - clients finishes and answered when it
    finishes itself. So its latency is finish[i] - finish[i - clients] (finish[i] for the first ones)."""
    real, padded = system.padding.real, system.padding.padded
    finish: list[float] = []
    start = time.perf_counter()
    for req in requests:
        system.score(req)
        finish.append(time.perf_counter() - start)
    latencies = [finish[i] - (finish[i - clients] if i >= clients else 0.0) for i in range(len(finish))]
    return {
        "seconds": finish[-1],
        "pairs": sum(len(r.documents) for r in requests),
        "latencies": latencies,
        "real_tokens": system.padding.real - real,
        "padded_tokens": system.padding.padded - padded,
    }


def serve(system_name: str, model_dir: str) -> None:
    """Answer the orchestrator's commands until stdin closes."""
    # Libraries print to stdout; keep the protocol on a private copy of it.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    system = SYSTEMS[system_name](model_dir)
    words = vocabulary(model_dir)
    out.write(json.dumps({"ready": True, "label": system.label, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "big":
            answer = run_big(system, big_request(words, cmd["docs"]))
        elif op == "concurrent":
            reqs = small_requests(words, cmd["requests"], cmd["docs_per_request"])
            answer = run_concurrent(system, reqs, cmd["clients"])
        elif op == "warmup":
            system.score(small_requests(words, 1, 32)[0])
            answer = {}
        elif op == "peak":
            answer = {"peak_rss_bytes": peak_rss_bytes()}
        else:
            answer = {"error": f"unknown op {op!r}"}
        out.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
