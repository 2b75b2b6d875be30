"""Sections that run models in this process.

d. peers: the bge shape's 1,000 and 10,000 documents through FlagEmbedding's FlagReranker fp16 and
   sentence-transformers' CrossEncoder fp16 at batch 32 and 128, and a plain length-sorted fp16 loop whose
   device-busy time gives what the model itself does on the card (real tokens/s).
f. qwen3_official: the official Qwen3-Reranker scoring code (shared/notes/models.md: template, left padding,
   logits at every position) on the Qwen3-4B checkpoint in nf4 via BitsAndBytesConfig, batch 32 x 512.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_check import gpu_memory, workloads
from bench.gpu_check.checkpoints import ensure
from bench.gpu_check.flops import flop_model, of_peak, tflops
from bench.gpu_check.plan import Plan
from bench.gpu_check.record import Recorder
from bench.gpu_check.report import LOOP_SYSTEM
from bench.sorted_loop import length_runs, padded

MAX_LENGTH = 512


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SortedLoop:
    """What a user writes by hand: tokenize all pairs, sort by length, cut batches under a padded-token
    budget, forward each in fp16. CUDA events around each forward give the device-busy time."""

    def __init__(self, path: Path, device: str, budget: int) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype).to(device).eval()
        self.device, self.budget = device, budget

    @torch.inference_mode()
    def score(self, query: str, docs: list[str]) -> tuple[np.ndarray, float]:
        enc = self.tokenizer([query] * len(docs), docs, truncation="only_second", max_length=MAX_LENGTH)
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        pad = self.tokenizer.pad_token_id or 0
        cuda = self.device == "cuda"
        outputs, events = [], []
        for rows in length_runs([len(x) for x in ids], self.budget):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in padded(ids, types, rows, pad).items()}
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            logits = self.model(**batch).logits.view(-1).float()
            if cuda:
                e1.record()
                events.append((e0, e1))
            outputs.append((rows, logits))
        _sync()
        device_s = sum(a.elapsed_time(b) for a, b in events) / 1000 if cuda else float("nan")
        scores = np.empty(len(ids), dtype=np.float32)
        for rows, logits in outputs:
            scores[rows] = logits.cpu().numpy()
        return scores, device_s


def _timed(fn) -> tuple[Any, float]:
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def peers(rec: Recorder, plan: Plan, ctx: dict) -> None:
    path, built = ensure("bge_shape", plan.work, plan.smoke)
    rec.put("build_s", built)
    device = _device()
    half = "fp16" if device == "cuda" else "fp32"  # FlagReranker turns fp16 off on a CPU; the others follow
    words = workloads.bge_words(path)
    fm = flop_model(path)
    ceiling = ((ctx.get("ceilings") or {}).get("matmul_fp16") or {}).get("tflops")
    count = workloads.PairTokens(path, MAX_LENGTH)
    reqs = {n: workloads.bge_big(words, n) for n in plan.big_docs}
    tokens = {n: count(r.query, r.documents) for n, r in reqs.items()}
    warm = [(reqs[plan.big_docs[0]].query, d) for d in reqs[plan.big_docs[0]].documents[:64]]
    results: dict[str, dict[str, Any]] = {}

    def record(system: str, n: int, seconds: float, extra: dict | None = None) -> None:
        row = {"docs": n, "seconds": seconds, "pairs_per_s": n / seconds, "real_tokens_per_s": sum(tokens[n]) / seconds}
        row["tflops"] = tflops(fm.total(tokens[n]), seconds)
        row["of_peak"] = of_peak(row["tflops"], ceiling)
        row.update(extra or {})
        results.setdefault(system, {})[str(n)] = row
        rec.put("systems", results)

    # Each system is loaded, warmed, run on every size, then freed: one model on the card at a time.
    with rec.step("loop"):
        loop = SortedLoop(path, device, plan.loop_budget)
        loop.score(warm[0][0], [d for _, d in warm])
        for n, r in reqs.items():
            (scores, device_s), seconds = _timed(lambda: loop.score(r.query, r.documents))
            extra = {"device_s": device_s, "device_real_tokens_per_s": sum(tokens[n]) / device_s if device_s == device_s else None}
            if device_s == device_s:
                extra["device_tflops"] = tflops(fm.total(tokens[n]), device_s)
                extra["device_of_peak"] = of_peak(extra["device_tflops"], ceiling)
            record(f"{LOOP_SYSTEM} {half} {plan.loop_budget:,} tokens", n, seconds, extra)
        del loop
        _free()

    with rec.step("crossencoder"):
        from sentence_transformers import CrossEncoder

        ce = CrossEncoder(str(path), device=device, max_length=MAX_LENGTH)
        if device == "cuda":
            (ce if isinstance(ce, torch.nn.Module) else ce.model).half()
        for batch in plan.peer_batches:
            ce.predict(warm, batch_size=batch, show_progress_bar=False)
            for n, r in reqs.items():
                pairs = [(r.query, d) for d in r.documents]
                _, seconds = _timed(lambda: ce.predict(pairs, batch_size=batch, show_progress_bar=False))
                record(f"CrossEncoder {half} b{batch}", n, seconds)
        del ce
        _free()

    with rec.step("flagreranker"):
        try:
            from FlagEmbedding import FlagReranker
        except Exception as exc:  # noqa: BLE001 - a peer that cannot import there is reported, not faked
            rec.put("flagreranker_import", f"{type(exc).__name__}: {exc}"[:400])
            raise
        fr = FlagReranker(str(path), use_fp16=device == "cuda", devices=[device], max_length=MAX_LENGTH)
        for batch in plan.peer_batches:
            fr.compute_score(warm, batch_size=batch)
            for n, r in reqs.items():
                pairs = [(r.query, d) for d in r.documents]
                _, seconds = _timed(lambda: fr.compute_score(pairs, batch_size=batch))
                record(f"FlagReranker {half} b{batch}", n, seconds)
        del fr
        _free()


# -- f. the official Qwen3-Reranker code ------------------------------------------------------------------

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class OfficialQwen3:
    """QwenLM/Qwen3-Embedding's Qwen3-Reranker example, as published (format_instruction, process_inputs,
    compute_logits), with the model loaded in nf4 (double quantization, bf16 compute) as notes/models.md says."""

    def __init__(self, path: Path, device: str, max_length: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        compute = torch.bfloat16
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side="left")
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True
        )
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=bnb, dtype=compute, device_map={"": device}
        ).eval()
        self.max_length = max_length
        self.device = device
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.prefix_tokens = self.tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(SUFFIX, add_special_tokens=False)

    @staticmethod
    def format_instruction(instruction: str, query: str, doc: str) -> str:
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def process_inputs(self, pairs: list[str]):
        inputs = self.tokenizer(
            pairs, padding=False, truncation="longest_first", return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)
        for key in inputs:
            inputs[key] = inputs[key].to(self.device)
        return inputs

    @torch.no_grad()
    def compute_logits(self, inputs) -> list[float]:
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        return batch_scores[:, 1].exp().tolist()

    def score(self, query: str, docs: list[str], batch: int) -> tuple[list[float], list[int]]:
        scores, widths = [], []
        for start in range(0, len(docs), batch):
            pairs = [self.format_instruction(INSTRUCTION, query, d) for d in docs[start : start + batch]]
            inputs = self.process_inputs(pairs)
            widths.append(int(inputs["input_ids"].shape[1]))
            scores += self.compute_logits(inputs)
        return scores, widths


def qwen3_official(rec: Recorder, plan: Plan, ctx: dict) -> None:
    path, built = ensure("qwen3_4b", plan.work, plan.smoke)
    rec.put("build_s", built)
    device = _device()
    req, _ = workloads.qwen_pairs(plan.qwen_pairs, plan.qwen_doc_words)
    cuda = device == "cuda"
    start = time.perf_counter()
    official = OfficialQwen3(path, device, plan.qwen_max_length)
    rec.put("load_s", time.perf_counter() - start)
    if cuda:
        rec.put("after_load", {"allocated_gib": torch.cuda.memory_allocated() / 2**30, "reserved_gib": torch.cuda.memory_reserved() / 2**30})
    with rec.step("warm"):
        official.score(req.query, req.documents[: plan.qwen_batch], plan.qwen_batch)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with rec.step("score"):
        (scores, widths), seconds = _timed(lambda: official.score(req.query, req.documents, plan.qwen_batch))
        out: dict[str, Any] = {
            "pairs": len(scores), "batch": plan.qwen_batch, "widths": sorted(set(widths)), "seconds": seconds,
            "pairs_per_s": len(scores) / seconds, "finite_scores": sum(1 for s in scores if s == s),
        }
        if cuda:
            out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        out["process"] = gpu_memory.snapshot(os.getpid())
        rec.put("score", out)
