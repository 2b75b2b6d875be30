"""Routes: a name clients send as `model` that picks one of several models for each request.

A route splits traffic by weight (one entry = a plain alias), optionally sticky per tenant or per user,
falls back in order when the chosen model cannot answer, and may mirror requests to a shadow model
(`serving.shadow`). Requests that name a model directly bypass all of this.

Sticky assignment hashes (route, key) with sha256 into [0, 1) and walks the cumulative weights, so the
same user lands on the same variant in every request and on every replica that serves the same registry,
with no shared state.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

from core.config import Registry
from core.errors import BadRequest, Forbidden, NotFound

# Request headers: a tester forces a variant; a client names its user when the body has no `user`.
VARIANT_HEADER = "x-rerank-variant"
USER_HEADER = "x-user-id"


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    split: tuple[tuple[str, float], ...]  # (model id, weight), sorted by model id, weights > 0
    sticky: str
    fallback: tuple[str, ...]
    shadow: str | None
    shadow_percent: float

    @property
    def members(self) -> set[str]:
        return {m for m, _ in self.split} | set(self.fallback) | ({self.shadow} if self.shadow else set())


@dataclass(frozen=True, slots=True)
class Decision:
    name: str  # what the request asked for (default_model applied): a route, a model id or an alias
    route: str | None  # the route that decided; None when a model was named directly
    candidates: tuple[str, ...]  # model ids to try in order: the chosen one, then the fallbacks
    forced: bool = False
    shadow: str | None = None  # the model that mirrors this request, when it is sampled


def stable_fraction(route: str, key: str) -> float:
    """A number in [0, 1) fixed by (route, key): the same on every request, process and machine."""
    digest = hashlib.sha256(f"{route}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def pick(split: tuple[tuple[str, float], ...], u: float) -> str:
    """The variant whose slice of the cumulative weights holds u."""
    total = sum(w for _, w in split)
    edge = 0.0
    for model_id, weight in split:
        edge += weight / total
        if u < edge:
            return model_id
    return split[-1][0]  # u within rounding of 1.0


class RouteTable:
    """The routes of one registry, with every model name resolved to a model id."""

    def __init__(self, registry: Registry, names: dict[str, str]) -> None:
        self.default = registry.default_model
        self.names = names
        self.routes: dict[str, CompiledRoute] = {}
        for name, route in registry.routes.items():
            weights: dict[str, float] = {}
            for target, weight in route.split.items():
                weights[names[target]] = weights.get(names[target], 0.0) + weight
            fallback = tuple(dict.fromkeys(names[t] for t in route.fallback))
            self.routes[name] = CompiledRoute(
                name=name,
                # Sorted by id so that reordering keys in the YAML does not move users between variants.
                split=tuple(sorted((m, w) for m, w in weights.items() if w > 0)),
                sticky=route.sticky,
                fallback=fallback,
                shadow=names[route.shadow.model] if route.shadow else None,
                shadow_percent=route.shadow.percent if route.shadow else 0.0,
            )

    def decide(
        self,
        name: str | None,
        *,
        tenant: str = "",
        user: str | None = None,
        variant: str | None = None,
        allowed: Callable[[str], bool] = lambda model_id: True,
        rand: Callable[[], float] = random.random,
    ) -> Decision:
        """Which models answer a request for `name`, in order. `allowed(model_id)` says whether the caller
        may use a model directly; it gates forcing a variant. 404 for unknown names, 400/403 for a bad
        forced variant."""
        name = name or self.default
        route = self.routes.get(name)
        if route is None:
            model_id = self.names.get(name)
            if model_id is None:
                known = sorted({*self.names, *self.routes})
                raise NotFound(f"model {name!r} not found; available: {', '.join(known)}")
            return Decision(name=name, route=None, candidates=(model_id,))
        shadow = route.shadow if route.shadow and rand() * 100.0 < route.shadow_percent else None
        if variant:
            model_id = self.names.get(variant)
            if model_id is None or model_id not in route.members:
                raise BadRequest(
                    f"{VARIANT_HEADER}: {variant!r} is not a model of route {name!r}; "
                    f"its models: {', '.join(sorted(route.members))}"
                )
            if not allowed(model_id):
                raise Forbidden(f"{VARIANT_HEADER}: this API key may not use model {variant!r}")
            # A forced variant answers or fails: falling back would hide what the tester asked to see.
            return Decision(name=name, route=name, candidates=(model_id,), forced=True, shadow=shadow)
        key = tenant if route.sticky == "tenant" else user if route.sticky == "user" else None
        u = stable_fraction(name, key) if key is not None else rand()
        chosen = pick(route.split, u)
        candidates = (chosen, *(m for m in route.fallback if m != chosen))
        return Decision(name=name, route=name, candidates=candidates, shadow=shadow)
