"""Qwen3 shared-prefix benchmark: pairs/s with the prefix run once (backends.qwen3's default) against every
pair run whole, through the backend's own collate and forward, on the real-size Qwen3-Reranker-4B
architecture (hidden 2560, 32 heads / 8 kv-heads x 128, intermediate 9728, vocabulary 151,669) with
random bf16 weights, on the CPU.

    python -m bench.qwen3_prefix_bench                 # 64 docs x 128 tokens, 4 of the 36 layers
    python -m bench.qwen3_prefix_bench --layers 36 --docs 16 --rounds 1    # the whole model (~8 GB)

Each decoder layer is identical, so the ratio does not depend on the depth; fewer layers make a run
minutes instead of an hour on 2 cores (--layers 36 builds the whole model). Weights are made on the meta
device and materialised once in bf16, never in fp32. Token ids are random; the lengths follow the real
tokenizer's counts for the default instruction: the chat-template prefix with instruction and a short query
~72 tokens, each document --doc-tokens, the closing template 12. Pairs are cut into batches under the
cpu profile's token budget (4,096) as the engine does, and the prefix's cache is reused across them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PREFIX_TOKENS = 72  # system prompt 38 + "<Instruct>: " + default instruction + "<Query>: " + query + "<Document>:"
SUFFIX_TOKENS = 12
BATCH_TOKENS = 4096


def build_backend(layers: int, tokenizer_dir: Path):
    """A Qwen3Backend around a real-size Qwen3 (random bf16 weights), with the tests' tiny tokenizer (only
    its pad id and the yes/no ids are used)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from backends.qwen3 import Qwen3Backend
    from core.config import effective, model_spec

    config = Qwen3Config(
        vocab_size=151669, hidden_size=2560, intermediate_size=9728, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1_000_000, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(p.dtype))
    spec = model_spec(backend="qwen3", source=str(tokenizer_dir), dtype="bfloat16", max_length=2048)
    backend = Qwen3Backend("qwen3-4b-random", spec, effective(spec, "cpu"))
    backend.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    backend.model = model
    backend.yes_id, backend.no_id = (backend._single_token(w) for w in ("yes", "no"))
    weight = model.get_output_embeddings().weight
    backend.yes_no = weight[backend.yes_id].float() - weight[backend.no_id].float()
    backend.pad_id = backend.tokenizer.pad_token_id
    return backend


def workload(docs: int, doc_tokens: int, seed: int = 7):
    """One request's items: the shared prefix + a document of doc_tokens +- 25% + the closing template."""
    from backends.base import Encoded
    from backends.prefix_cache import SharedPrefix, common_prefix

    rng = random.Random(seed)
    prefix = [rng.randrange(1000, 150000) for _ in range(PREFIX_TOKENS)]
    suffix = [rng.randrange(1000, 150000) for _ in range(SUFFIX_TOKENS)]
    items = []
    for _ in range(docs):
        n = rng.randint(doc_tokens * 3 // 4, doc_tokens * 5 // 4)
        items.append(Encoded(prefix + [rng.randrange(1000, 150000) for _ in range(n)] + suffix))
    # What Qwen3Backend.prepare puts in the request's context.
    context = SharedPrefix(common_prefix([it.input_ids for it in items]))
    return items, context


def batches(items):
    """Length-sorted runs under the token budget (longest x count), as the engine cuts them."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    out, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(items[order[end]].input_ids) * (end - start + 1) <= BATCH_TOKENS:
            end += 1
        out.append(order[start:end])
        start = end
    return out


def run(backend, items, context, share: bool) -> tuple[float, torch.Tensor]:
    backend.share_prefix = share
    backend.prefixes = type(backend.prefixes)()  # each request starts with a cold prefix cache
    scores = torch.empty(len(items))
    start = time.perf_counter()
    with torch.inference_mode():
        for rows in batches(items):
            scores[torch.tensor(rows)] = backend.forward(backend.collate([items[r] for r in rows], [context] * len(rows))).cpu()
    return time.perf_counter() - start, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the real model has 36)")
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--doc-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="on/off pairs, mirrored order every other round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tiny_models import build_qwen3_reranker

    tok_dir = build_qwen3_reranker(Path(tempfile.gettempdir()) / "rerank-bench-qwen3-tokenizer")
    built = time.perf_counter()
    backend = build_backend(args.layers, tok_dir)
    build_s = time.perf_counter() - built
    items, context = workload(args.docs, args.doc_tokens)
    tokens = sum(len(it.input_ids) for it in items)
    run(backend, items[:2], context, True)  # warm-up
    rates: dict[str, list[float]] = {"on": [], "off": []}
    ratios, diffs = [], []
    for rnd in range(args.rounds):
        order = ["off", "on"] if rnd % 2 == 0 else ["on", "off"]
        got = {}
        for mode in order:
            seconds, scores = run(backend, items, context, mode == "on")
            rates[mode].append(len(items) / seconds)
            got[mode] = scores
            print(f"round {rnd + 1}: prefix {mode}: {len(items) / seconds:.2f} pairs/s ({seconds:.1f} s)", file=sys.stderr, flush=True)
        ratios.append(rates["on"][-1] / rates["off"][-1])
        diffs.append((got["on"] - got["off"]).abs().max().item())
    res = {
        "model": f"Qwen3-4B architecture, random bf16 weights, {args.layers} of 36 layers",
        "workload": {"docs": args.docs, "doc_tokens": args.doc_tokens, "prefix_tokens": PREFIX_TOKENS,
                     "suffix_tokens": SUFFIX_TOKENS, "tokens": tokens, "batch_tokens": BATCH_TOKENS,
                     "batches": len(batches(items))},
        "torch_threads": torch.get_num_threads(),
        "build_seconds": build_s,
        "pairs_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "pairs_per_s_rounds": rates,
        "speedup": statistics.median(ratios),
        "speedup_rounds": ratios,
        "max_abs_raw_score_diff": max(diffs),
        "ideal_speedup_tokens": tokens / (tokens - PREFIX_TOKENS * (args.docs - 1)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"qwen3_prefix_L{args.layers}_D{args.docs}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
