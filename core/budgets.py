"""Token budgets chosen for a model that has no profile for this machine.

Users write plain registry entries; the default must be the fast one. Two rules, both from measurements:

- On a CPU: the budget measured fastest per inference thread on this kind of CPU, times the intra-op
  threads each CPU stream gets. bf16, MiniLM-L6 cross-encoder (`make bench`'s model), 2 streams x 1 thread:
  - AMD EPYC Zen 4, AVX512-BF16 without AMX: pairs per CPU-second 52 / 53 / 51 / 46 / 41 at 1,024 /
    2,048 / 4,096 / 8,192 / 16,384 tokens (padding 99.0 / 97.7 / 95.7 / 92.2 / 86.3%): 1,024.
  - Intel Xeon with AMX-BF16 (`rerank-gateway tune`, 400 mixed-length pairs, 2026-11-24): 68 / 69 / 79 /
    81 / 68 / 58 at 512 / 1,024 / 2,048 / 4,096 / 8,192 / 16,384: 2,048, 3.2% under 4,096 (one run on a
    loaded machine: within its noise) and a smaller batch pads and waits less. AMX makes the matmuls cheap
    enough that the per-op overhead of small batches shows.
  More threads per stream are given proportionally more tokens (each thread keeps the GEMM share measured
  best): an extrapolation past the measured 1 thread, and the reason string says so.
- On a GPU: the knee of the throughput curve. The load measures real tokens/s and peak memory at a ladder
  of budgets (powers of two from LADDER_MIN, up to what fits the model's memory budget beside its weights:
  its `memory_budget_gb`, else an even share of the card, less a margin for the caching allocator's
  fragmentation and the kernels' workspace) and takes the smallest budget within KNEE_TOLERANCE of the
  fastest. The first GPU run gave a plain entry the whole memory share (1,048,576 tokens): a Qwen3-4B nf4
  process held 37 GB, while 16,384 -> 65,536 tokens gained 14% of throughput; bigger batches also pad
  more and keep a search waiting longer behind a batch that cannot be interrupted.
"""

from __future__ import annotations

from core.host import cpu_cores, cpu_kind

# Tokens per batch per intra-op thread, fastest at 1 thread per stream, by CPU kind (above). Families
# without a measurement of their own use the encoder cross-encoder's until `rerank-gateway tune` gives
# them one.
CPU_BEST_TOKENS_PER_THREAD = {"amx": 2048, "other": 1024}
CPU_MEASURED_BACKENDS = ("flag", "embedding")
# Fraction of the memory budget a chosen GPU batch may use after the weights: the warm-up measures live
# tensors; fragmentation and cuBLAS/attention workspace come on top.
GPU_MARGIN = 0.10
# The first warm-up on a GPU with no profile runs at this many tokens (or max_length, if larger); the
# chosen budget is then proven by a second warm-up at its own size.
GPU_PROBE_TOKENS = 8192
# Chosen budgets are rounded down to a multiple of this (and never below one full-length pair).
ROUND_TOKENS = 256
# The GPU ladder: rungs LADDER_MIN, 2x, 4x ... up to LADDER_MAX and the memory cap; the climb stops early
# once LADDER_FLAT rungs in a row gain under LADDER_GAIN. The knee: the smallest rung within
# KNEE_TOLERANCE of the fastest.
LADDER_MIN = 4096
LADDER_MAX = 262144
LADDER_GAIN = 0.02
LADDER_FLAT = 2
# ... or once a rung's batch takes this long: a search that arrives waits for a batch in flight.
LADDER_MAX_BATCH_S = 0.5
KNEE_TOLERANCE = 0.05


def cpu_budget(backend: str, cpu_streams: int, cores: int | None = None, kind: str | None = None) -> tuple[int, str]:
    """(max_batch_tokens, why) for a profile-less model on a CPU."""
    cores = cores or cpu_cores()
    kind = kind or cpu_kind()
    streams = max(1, min(cpu_streams, cores))
    threads = max(1, cores // streams)
    per_thread = CPU_BEST_TOKENS_PER_THREAD[kind]
    tokens = per_thread * threads
    basis = (
        "measured fastest for this architecture family" if backend in CPU_MEASURED_BACKENDS
        else "the encoder cross-encoder's measured best (no CPU measurement of this family yet)"
    )
    cpu = "with AMX-BF16" if kind == "amx" else "without AMX"
    extrapolated = "" if threads == 1 else f", scaled from the 1-thread measurement to {threads} threads"
    why = (
        f"auto (no cpu profile): {per_thread} tokens per intra-op thread on a CPU {cpu} x {threads} "
        f"({cores} cores / {streams} streams), {basis}{extrapolated}; `rerank-gateway tune` measures this machine"
    )
    return tokens, why


def usable_gb(memory_gb: float) -> float:
    """What a card offers the models: its memory less the CUDA context, the caching allocator's
    fragmentation and the gap between the marketed and the real size (a "16 GB" T4 has 15.1 GiB)."""
    return memory_gb - max(1.0, 0.05 * memory_gb)


# Pairs a batch may hold when the registry does not say: 256, or on a GPU enough for the token budget's worth
# of short pairs (a packed batch costs its tokens, not its rows: a 131,072-token H200 budget of ~114-token
# pairs needs 1,150 rows, which 256 would cut to 29,000 tokens).
DEFAULT_BATCH_PAIRS = 256
GPU_PAIR_TOKENS = 32


def batch_pairs(max_batch_tokens: int, device: str) -> int:
    if device == "cpu":
        return DEFAULT_BATCH_PAIRS
    return max(DEFAULT_BATCH_PAIRS, max_batch_tokens // GPU_PAIR_TOKENS)


def gpu_probe_tokens(max_length: int) -> int:
    return max(GPU_PROBE_TOKENS, max_length)


def gpu_budget(
    *, weights_bytes: int, activation_bytes: int, probe_tokens: int, budget_bytes: float, max_length: int,
    max_tokens: int = 1 << 20,
) -> tuple[int, str]:
    """(max_batch_tokens, why) from one warm-up at probe_tokens: the largest batch whose activations, at the
    measured bytes per token, fit (1 - margin) of what the budget leaves beside the weights.

    Raises ValueError when not even one full-length pair fits."""
    per_token = activation_bytes / max(probe_tokens, 1)
    room = budget_bytes * (1 - GPU_MARGIN) - weights_bytes
    fit = int(room / per_token) if per_token > 0 else max_tokens
    tokens = min(max_tokens, fit // ROUND_TOKENS * ROUND_TOKENS)
    gib = 1024**3
    why = (
        f"auto (no profile for this GPU): {budget_bytes / gib:.2f} GiB budget x {1 - GPU_MARGIN:.0%} - weights "
        f"{weights_bytes / gib:.2f} GiB, at {per_token / 1024:.1f} KiB/token measured by the warm-up at "
        f"{probe_tokens} tokens"
    )
    if tokens < max_length:
        raise ValueError(f"{why}: room for {fit} tokens, less than one pair of max_length {max_length}")
    return tokens, why


def ladder_rungs(max_length: int, cap_tokens: int) -> list[int]:
    """Budgets to measure: powers of two from LADDER_MIN (or the first holding one full-length pair) up to
    the memory cap and LADDER_MAX; the cap itself when no power of two fits under it."""
    rung = LADDER_MIN
    while rung < max_length:
        rung *= 2
    rungs = []
    while rung <= min(cap_tokens, LADDER_MAX):
        rungs.append(rung)
        rung *= 2
    return rungs or [max(max_length, cap_tokens // ROUND_TOKENS * ROUND_TOKENS)]


def climbing(rates: list[float]) -> bool:
    """Whether the ladder still gains: false once the last LADDER_FLAT rungs each gained under LADDER_GAIN."""
    if len(rates) <= LADDER_FLAT:
        return True
    recent = rates[-LADDER_FLAT - 1 :]
    return any(b > a * (1 + LADDER_GAIN) for a, b in zip(recent, recent[1:]))


def knee(rungs: list[tuple[int, float]], tolerance: float = KNEE_TOLERANCE) -> int:
    """The smallest budget whose measured tokens/s is within `tolerance` of the fastest rung's."""
    fastest = max(rate for _, rate in rungs)
    return min(tokens for tokens, rate in rungs if rate >= (1 - tolerance) * fastest)
