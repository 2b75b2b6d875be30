"""Prometheus metrics. One CollectorRegistry per app, so several apps (tests, replicas in one process)
never share or clash."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
AGREEMENT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)
# The first bound is 0, not negative: prometheus_client drops a histogram's _sum when a bound is below 0.
CORRELATION_BUCKETS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rerank_requests", "Rerank requests by model, status and tenant", ["model", "status", "tenant"], registry=r)
        self.request_seconds = Histogram("rerank_request_seconds", "End-to-end request latency", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("rerank_queue_seconds", "Time from queueing to the first batch", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokenize_seconds = Histogram("rerank_tokenize_seconds", "Tokenization time per request", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("rerank_inference_seconds", "Forward time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_pairs = Histogram("rerank_batch_pairs", "Pairs per batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_tokens = Histogram("rerank_batch_padded_tokens", "Tokens a batch counted against its budget (padded rows; a shared prefix once, plus its share of each row's attention)", ["model"], buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536), registry=r)
        # Per step of a batch on its inference thread (engine.step_time): wall time, waits included, and CPU time.
        self.step_seconds = Counter("rerank_batch_step_seconds", "Inference threads' wall time in each step of a batch (build, wait_launch, collate, forward, sync, metrics, scatter, pool), waits included", ["model", "step"], registry=r)
        self.step_cpu_seconds = Counter("rerank_batch_step_cpu_seconds", "Inference threads' CPU time in each step of a batch", ["model", "step"], registry=r)
        self._steps: dict[tuple[str, str], tuple[Any, Any]] = {}  # labelled children, looked up once
        self.real_tokens = Counter("rerank_real_tokens", "Real (unpadded) tokens run through the model", ["model"], registry=r)
        self.padded_tokens = Counter("rerank_padded_tokens", "Tokens the model's batches counted against the budget (engine.batching.BatchCost): padded rows, a packed batch's real tokens, a shared prefix once plus its share of each row's attention", ["model"], registry=r)
        self.padding_efficiency = Gauge("rerank_padding_efficiency", "Real tokens (every pair whole) / computed tokens over the model's lifetime; above 1 where shared prefixes saved more than padding cost", ["model"], registry=r)
        self.queue_pairs = Gauge("rerank_queue_pairs", "Pairs waiting", ["model"], registry=r)
        self.queue_tokens = Gauge("rerank_queue_tokens", "Tokens waiting", ["model"], registry=r)
        self.oom_recoveries = Counter("rerank_oom_recoveries", "Batches split after an out-of-memory error", ["model"], registry=r)
        self.cancelled = Counter("rerank_cancelled_requests", "Requests whose queued work was dropped (timeout, disconnect)", ["model"], registry=r)
        self.device_memory = Gauge("rerank_device_memory_bytes", "Device memory allocated by torch", ["device"], registry=r)
        self.search_units = Counter("rerank_search_units", "Search units served", ["model", "tenant"], registry=r)
        # Routes and shadow traffic (serving.routing, serving.shadow).
        self.route_requests = Counter("rerank_route_requests", "Requests answered through a route, by the model that answered", ["route", "model"], registry=r)
        self.route_fallbacks = Counter("rerank_route_fallbacks", "Models a route passed over, by cause (unavailable, loading, overloaded, failed)", ["route", "model", "cause"], registry=r)
        self.shadow_requests = Counter("rerank_shadow_requests", "Shadow requests by outcome (compared, dropped_busy, dropped_overloaded, dropped_unavailable, dropped_backlog, failed)", ["route", "shadow", "outcome"], registry=r)
        self.shadow_comparisons = Counter("rerank_shadow_comparisons", "Primary/shadow ranking comparisons", ["route", "primary", "shadow"], registry=r)
        self.shadow_top1_agreements = Counter("rerank_shadow_top1_agreements", "Comparisons whose top-1 document was the same for both models", ["route", "primary", "shadow"], registry=r)
        self.shadow_overlap = Histogram("rerank_shadow_overlap", "overlap@k of the two models' top-k sets", ["route", "primary", "shadow", "k"], buckets=AGREEMENT_BUCKETS, registry=r)
        self.shadow_kendall_tau = Histogram("rerank_shadow_kendall_tau", "Kendall tau-b of the two full rankings", ["route", "primary", "shadow"], buckets=CORRELATION_BUCKETS, registry=r)
        self.shadow_spearman = Histogram("rerank_shadow_spearman", "Spearman rho of the two full rankings", ["route", "primary", "shadow"], buckets=CORRELATION_BUCKETS, registry=r)
        self.shadow_agreement = Gauge("rerank_shadow_agreement", "Running mean of each agreement statistic (top1, overlap_at_1/3/10, kendall_tau, spearman)", ["route", "primary", "shadow", "stat"], registry=r)
        self.shadow_score = Gauge("rerank_shadow_score", "Relevance score distribution of each side of a shadow comparison", ["route", "model", "role", "stat"], registry=r)
        self.documents = Counter("rerank_documents", "Documents reranked", ["model", "tenant"], registry=r)
        self.billed_tokens = Counter("rerank_billed_tokens", "Tokens of answered requests", ["model", "tenant"], registry=r)
        self.limited = Counter("rerank_limited_requests", "Requests refused by a tenant limit", ["tenant", "limit"], registry=r)
        # Upstream endpoints of `backend: remote` models (pool.upstream_endpoints, pool.remote_runner).
        up = ["model", "endpoint"]
        self.upstream_requests = Counter("rerank_upstream_requests", "Calls to an upstream endpoint by outcome (ok, http_429, http_4xx, http_5xx, connect_error, timeout, transport_error, bad_response, cancelled)", [*up, "outcome"], registry=r)
        self.upstream_seconds = Histogram("rerank_upstream_seconds", "Latency of calls to an upstream endpoint", up, buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_ejections = Counter("rerank_upstream_ejections", "Times an upstream endpoint was ejected for a cool-down", up, registry=r)
        self.upstream_in_flight = Gauge("rerank_upstream_in_flight", "Calls outstanding on an upstream endpoint", up, registry=r)
        self.upstream_up = Gauge("rerank_upstream_up", "1 while an upstream endpoint takes traffic, 0 while ejected", up, registry=r)
        self._real: dict[str, float] = {}
        self._padded: dict[str, float] = {}

    def observe_batch(self, model: str, pairs: int, real: int, padded: int, seconds: float) -> None:
        self.inference_seconds.labels(model).observe(seconds)
        self.batch_pairs.labels(model).observe(pairs)
        self.batch_tokens.labels(model).observe(padded)
        self.real_tokens.labels(model).inc(real)
        self.padded_tokens.labels(model).inc(padded)
        self._real[model] = self._real.get(model, 0) + real
        self._padded[model] = self._padded.get(model, 0) + padded
        self.padding_efficiency.labels(model).set(self._real[model] / max(self._padded[model], 1))

    def observe_steps(self, model: str, spent: dict[str, list[float]]) -> None:
        """One batch's [wall, CPU] seconds by step."""
        for step, (wall, cpu) in spent.items():
            counters = self._steps.get((model, step))
            if counters is None:
                counters = self._steps[(model, step)] = (self.step_seconds.labels(model, step), self.step_cpu_seconds.labels(model, step))
            counters[0].inc(max(wall, 0.0))
            counters[1].inc(max(cpu, 0.0))

    def render(self) -> bytes:
        try:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    self.device_memory.labels(f"cuda:{i}").set(torch.cuda.memory_allocated(i))
        except Exception:  # noqa: BLE001 - metrics must render even with a broken CUDA runtime
            pass
        return generate_latest(self.registry)
