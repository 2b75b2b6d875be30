"""Shadow traffic and the per-route report.

After a routed request has been answered, its shadow model scores the same documents in a detached task;
the caller never waits for it. The shadow runs as its own tenant with a tiny fair-queue weight and the
lowest priority, so real traffic on the shadow model always goes first, and it is dropped (and counted)
rather than queued when its model is already busy: under load the shadow is the first thing to go.

Each comparison records how the two rankings agree (serving.agreement) into Prometheus series and into
the JSON served at GET /v1/routes/<name>/report. Statistics live for the app's lifetime, across reloads.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import numpy as np

from core.config import Route
from core.errors import ModelUnavailable, TooManyRequests
from core.rerank import RerankRequest, RerankResult
from observability.metrics import Metrics
from pool.model_pool import ModelPool
from serving.agreement import OVERLAP_KS, Agreement, ScoreSummary, compare
from tenancy.caller import Caller

# Scores a request on the shadow model, as the given caller (serving.pipeline.RerankPipeline.score).
Score = Callable[[RerankRequest, Caller], Awaitable[RerankResult]]

log = logging.getLogger("rerank_gateway.shadow")

SHADOW_TENANT = "__shadow__"
# Start-time fair queueing gives a tenant a share proportional to its weight: against a real tenant of
# weight 1 the shadow gets about 1% of the model while both have work queued.
SHADOW_WEIGHT = 0.01
SHADOW_PRIORITY = 999
# Shadow requests past this many in flight (tokenizing, queued or scoring) are dropped, bounding memory.
MAX_IN_FLIGHT = 64


@dataclasses.dataclass
class PairStats:
    """Agreement between one primary model and the shadow, summed over comparisons."""

    compared: int = 0
    top1: int = 0
    overlap_sum: dict[int, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(OVERLAP_KS, 0.0))
    overlap_n: dict[int, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(OVERLAP_KS, 0))
    tau_sum: float = 0.0
    tau_n: int = 0
    rho_sum: float = 0.0
    rho_n: int = 0

    def add(self, a: Agreement) -> None:
        self.compared += 1
        self.top1 += a.top1
        for k, value in a.overlap.items():
            self.overlap_sum[k] += value
            self.overlap_n[k] += 1
        if a.kendall_tau is not None:
            self.tau_sum += a.kendall_tau
            self.tau_n += 1
        if a.spearman is not None:
            self.rho_sum += a.spearman
            self.rho_n += 1

    def describe(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "top1_agreement": self.top1 / self.compared if self.compared else None,
            "overlap_at_k": {str(k): _mean(self.overlap_sum[k], self.overlap_n[k]) for k in OVERLAP_KS},
            "overlap_at_k_compared": {str(k): self.overlap_n[k] for k in OVERLAP_KS},
            "kendall_tau": _mean(self.tau_sum, self.tau_n),
            "spearman": _mean(self.rho_sum, self.rho_n),
        }


@dataclasses.dataclass
class RouteStats:
    since: float = dataclasses.field(default_factory=time.time)
    answered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fallbacks: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (model, cause)
    shadow_outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    pairs: dict[tuple[str, str], PairStats] = dataclasses.field(default_factory=dict)
    scores: dict[tuple[str, str], ScoreSummary] = dataclasses.field(default_factory=dict)  # (role, model)


class ShadowRecorder:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.routes: dict[str, RouteStats] = {}
        self._tasks: set[asyncio.Task] = set()

    def _stats(self, route: str) -> RouteStats:
        stats = self.routes.get(route)
        if stats is None:
            stats = self.routes[route] = RouteStats()
        return stats

    # -- called by serving.pipeline for every routed answer --------------------------------------------
    def answered(self, route: str, model_id: str, skipped: list[tuple[str, str]]) -> None:
        stats = self._stats(route)
        stats.answered[model_id] += 1
        for skipped_id, cause in skipped:
            stats.fallbacks[(skipped_id, cause)] += 1

    def mirror(
        self, pool: ModelPool, route: str, shadow_id: str, req: RerankRequest, primary: RerankResult, *, score: Score
    ) -> None:
        """Start the shadow request in the background, or count why it was dropped. Never blocks."""
        if len(self._tasks) >= MAX_IN_FLIGHT:
            return self._outcome(route, shadow_id, "dropped_backlog")
        # A lazy shadow starts loading; this request is not mirrored meanwhile.
        if pool.unready_cause(shadow_id) is not None:
            return self._outcome(route, shadow_id, "dropped_unavailable")
        # More than one batch already waiting means the model has real work to do: skip rather than queue.
        # (A remote shadow has no queue here; MAX_IN_FLIGHT bounds it.)
        if pool.busy(shadow_id):
            return self._outcome(route, shadow_id, "dropped_busy")
        task = asyncio.get_running_loop().create_task(self._run(score, route, shadow_id, req, primary))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, score: Score, route: str, shadow_id: str, req: RerankRequest, primary: RerankResult) -> None:
        shadow_req = dataclasses.replace(req, model=shadow_id, top_n=None, raw_scores=False, priority=SHADOW_PRIORITY)
        try:
            shadow = await score(shadow_req, Caller(SHADOW_TENANT, SHADOW_WEIGHT))
        except TooManyRequests:
            return self._outcome(route, shadow_id, "dropped_overloaded")
        except ModelUnavailable:
            return self._outcome(route, shadow_id, "dropped_unavailable")
        except Exception as exc:  # noqa: BLE001 - a failing shadow is counted, never raised anywhere
            log.warning("shadow request to %s for route %s failed: %s", shadow_id, route, exc)
            return self._outcome(route, shadow_id, "failed")
        n = len(req.texts)
        p_scores, s_scores = _by_document(primary, n), _by_document(shadow, n)
        # Kendall/Spearman on 10,000 documents take milliseconds of numpy: keep them off the event loop.
        agreement = await asyncio.to_thread(compare, p_scores, s_scores)
        self._record(route, primary.model, shadow_id, agreement, None if req.raw_scores else p_scores, s_scores)

    def _outcome(self, route: str, shadow_id: str, outcome: str) -> None:
        self._stats(route).shadow_outcomes[outcome] += 1
        self.metrics.shadow_requests.labels(route, shadow_id, outcome).inc()

    def _record(
        self, route: str, primary_id: str, shadow_id: str, a: Agreement, p_scores: np.ndarray | None, s_scores: np.ndarray
    ) -> None:
        stats = self._stats(route)
        pair = stats.pairs.setdefault((primary_id, shadow_id), PairStats())
        pair.add(a)
        self._outcome(route, shadow_id, "compared")
        m, labels = self.metrics, (route, primary_id, shadow_id)
        m.shadow_comparisons.labels(*labels).inc()
        if a.top1:
            m.shadow_top1_agreements.labels(*labels).inc()
        for k, value in a.overlap.items():
            m.shadow_overlap.labels(*labels, str(k)).observe(value)
        if a.kendall_tau is not None:
            m.shadow_kendall_tau.labels(*labels).observe(a.kendall_tau)
        if a.spearman is not None:
            m.shadow_spearman.labels(*labels).observe(a.spearman)
        described = pair.describe()
        means = {"top1": described["top1_agreement"], "kendall_tau": described["kendall_tau"], "spearman": described["spearman"]}
        means.update({f"overlap_at_{k}": v for k, v in described["overlap_at_k"].items()})
        for stat, value in means.items():
            if value is not None:
                m.shadow_agreement.labels(*labels, stat).set(value)
        for role, model_id, scores in (("primary", primary_id, p_scores), ("shadow", shadow_id, s_scores)):
            if scores is None:  # raw scores are on another scale than relevance scores; not mixed in
                continue
            summary = stats.scores.setdefault((role, model_id), ScoreSummary())
            summary.add(scores)
            for stat, value in summary.describe().items():
                if stat != "count":
                    m.shadow_score.labels(route, model_id, role, stat).set(value)

    # -- the report ---------------------------------------------------------------------------------------
    def report(self, name: str, route: Route) -> dict[str, Any]:
        stats = self.routes.get(name) or RouteStats()
        fallbacks: dict[str, dict[str, int]] = {}
        for (model_id, cause), count in sorted(stats.fallbacks.items()):
            fallbacks.setdefault(model_id, {})[cause] = count
        scores: dict[str, dict[str, Any]] = {"primary": {}, "shadow": {}}
        for (role, model_id), summary in sorted(stats.scores.items()):
            scores[role][model_id] = summary.describe()
        return {
            "route": name,
            "config": {
                "split": route.split,
                "sticky": route.sticky,
                "fallback": route.fallback,
                "shadow": {"model": route.shadow.model, "percent": route.shadow.percent} if route.shadow else None,
            },
            "since": datetime.fromtimestamp(stats.since, timezone.utc).isoformat(timespec="seconds"),
            "traffic": {"answered": dict(sorted(stats.answered.items())), "fallbacks": fallbacks},
            "shadow": {
                "requests": dict(sorted(stats.shadow_outcomes.items())),
                "agreement": [
                    {"primary": p, "shadow": s, **pair.describe()} for (p, s), pair in sorted(stats.pairs.items())
                ],
                "scores": scores,
            },
        }

    async def drain(self) -> None:
        """Wait for the shadow requests in flight (tests, orderly shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _by_document(result: RerankResult, n: int) -> np.ndarray:
    scores = np.full(n, np.nan)
    scores[np.asarray(result.indices, dtype=np.intp)] = result.scores
    return scores


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None
