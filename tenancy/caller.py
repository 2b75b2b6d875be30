"""Who is asking, as every stage after authentication sees it, and whom a request queues as."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Mapping

from core.config import Tenant
from dialects.upstream import TENANT_HEADER, TENANT_WEIGHT_HEADER


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the tenant name ("" when the gateway runs open), its fair-share weight, and the
    model names (ids, aliases, routes) it may use; None means all."""

    tenant: str = ""
    weight: float = 1.0
    models: frozenset[str] | None = None


_TENANT_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


def queued_as(caller: Caller, tenant: Tenant | None, headers: Mapping[str, str]) -> Caller:
    """The caller a request queues as. A tenant marked `forwards_tenants` (a front door) may name the
    tenant behind each request: it queues as "<front door>/<tenant>" with that tenant's weight, so the
    front door's tenants share this gateway's models fairly. Anyone else's header is ignored."""
    name = headers.get(TENANT_HEADER)
    if name is None or tenant is None or not tenant.forwards_tenants or not _TENANT_NAME.fullmatch(name):
        return caller
    try:
        weight = float(headers.get(TENANT_WEIGHT_HEADER, caller.weight))
    except ValueError:
        weight = caller.weight
    weight = weight if math.isfinite(weight) and 0 < weight <= 1000 else caller.weight
    return dataclasses.replace(caller, tenant=f"{caller.tenant}/{name}", weight=weight)
