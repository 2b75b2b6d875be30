"""What one run of the GPU check does: sizes of every workload, for the GPU and for the CPU smoke run.

Children get the plan as JSON (runner -> section), so both sides read the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# A T4 has 15 GiB of usable memory; a plain registry entry's even share of it (core.budgets.usable_gb:
# the card less max(1 GB, 5%)) is what its automatic budget is sized from there.
T4_MEMORY_GB = 15.0
T4_SHARE_GB = 14.0


@dataclass(frozen=True)
class Plan:
    smoke: bool
    work: str
    # c, d: one request of each size (bench.workload.big_request; ~114 real tokens a pair on the bge shape).
    big_docs: tuple[int, ...]
    # c: (clients, requests) closed loops of `small_docs`-document requests.
    closed_loops: tuple[tuple[int, int], ...]
    small_docs: int
    # c: requests of 16 more clients while py-spy samples the GIL's holder (bench.gil_budget).
    gil_requests: int
    # c: 3-document requests beside one request of `beside_docs` documents, and `alone_requests` of them alone.
    beside_docs: int
    alone_requests: int
    # d: in-process peers' batch sizes; the plain loop's padded-token budget.
    peer_batches: tuple[int, ...]
    loop_budget: int
    # e: the T4-like run (GTE): documents in one request, how many of them are long (and their words), and
    # the 16-client closed loop's requests.
    t4_docs: int
    t4_long_docs: int
    t4_long_words: int
    t4_loop_requests: int
    # f: Qwen3, official code and gateway: pairs (documents longer than max_length: every pair is cut to it).
    qwen_pairs: int
    qwen_batch: int
    qwen_max_length: int
    qwen_doc_words: int
    # g: documents scored padded and packed.
    parity_docs: int
    # b: the memory/speed table's token budget and the lengths per model.
    table_budget: int
    table_lengths: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Seconds a gateway gets to load its models (warm-up and budget ladder included).
    ready_timeout_s: float = 240.0
    # Fields added to every model entry. The smoke run pins `runtime: torch`: on a CPU `auto` would export
    # and time ONNX / OpenVINO at every load (what the GPU never does), and OpenVINO's bf16 compile of the
    # tiny GTE kills the process with SIGFPE on the Xeon (AMX) of the CPU machines (reported, not ours here).
    entry_extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Plan":
        data = json.loads(text)
        data["closed_loops"] = tuple(tuple(x) for x in data["closed_loops"])
        for key in ("big_docs", "peer_batches"):
            data[key] = tuple(data[key])
        data["table_lengths"] = {k: tuple(v) for k, v in data["table_lengths"].items()}
        return Plan(**data)


def gpu_plan(work: Path) -> Plan:
    return Plan(
        smoke=False, work=str(work), big_docs=(1000, 10000), closed_loops=((16, 160), (64, 320)), small_docs=20, gil_requests=160,
        beside_docs=10000, alone_requests=100, peer_batches=(128, 32), loop_budget=16384,
        t4_docs=10000, t4_long_docs=20, t4_long_words=9000, t4_loop_requests=160,
        qwen_pairs=320, qwen_batch=32, qwen_max_length=512, qwen_doc_words=800, parity_docs=1000,
        table_budget=16384,
        table_lengths={"bge-reranker-large": (512,), "gte-multilingual-reranker-base": (512, 8192), "qwen3-reranker-4b": (512, 8192)},
    )


def smoke_plan(work: Path) -> Plan:
    """Every section end to end on a CPU with the tests' tiny models: proves the script, measures nothing."""
    return Plan(
        smoke=True, work=str(work), big_docs=(100, 300), closed_loops=((16, 32), (64, 64)), small_docs=20, gil_requests=32,
        beside_docs=300, alone_requests=10, peer_batches=(128, 32), loop_budget=4096,
        t4_docs=300, t4_long_docs=3, t4_long_words=1500, t4_loop_requests=32,
        qwen_pairs=48, qwen_batch=16, qwen_max_length=256, qwen_doc_words=400, parity_docs=100,
        table_budget=1024,
        table_lengths={"bge-reranker-large": (256,), "gte-multilingual-reranker-base": (64, 256), "qwen3-reranker-4b": (64, 256)},
        ready_timeout_s=120.0, entry_extra={"runtime": "torch"},
    )
