"""Who is asking, as every stage after authentication sees it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the tenant name ("" when the gateway runs open), its fair-share weight, and the
    model names (ids, aliases, routes) it may use; None means all."""

    tenant: str = ""
    weight: float = 1.0
    models: frozenset[str] | None = None
