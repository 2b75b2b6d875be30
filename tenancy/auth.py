"""Who is calling: API key -> tenant (a `Caller`), which models it may use, and the admin key.

Keys are never stored, only their sha256. A presented key is hashed and compared with every configured
hash by `hmac.compare_digest`, without stopping at the first match, so the time taken says nothing about
which hash (or how much of one) matched. With no tenants configured the gateway runs open for a single
user: every request is the anonymous `Caller()`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable, Mapping, TypeVar

from core.config import Registry, Tenant, key_hashes
from core.errors import Forbidden, NotFound, Unauthorized
from tenancy.caller import Caller

T = TypeVar("T")


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key of a request: `Authorization: Bearer <key>` (Cohere SDK) or `X-API-Key: <key>`."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    if key and key.strip():
        return key.strip()
    return None


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _match(digest: str, candidates: Iterable[tuple[str, T]]) -> T | None:
    found: T | None = None
    presented = digest.encode("ascii")
    for stored, owner in candidates:
        # No early exit: every hash is compared whatever matched before.
        if hmac.compare_digest(presented, stored.encode("ascii")) and found is None:
            found = owner
    return found


def _tenant_hashes(registry: Registry) -> list[tuple[str, str]]:
    return [(h, name) for name, t in registry.tenants.items() for h in key_hashes(t.api_key_sha256)]


def allowed_names(registry: Registry, tenant: Tenant) -> frozenset[str] | None:
    """Every name the tenant may put in `model`: each allowed model's id and aliases, allowed routes."""
    if "*" in tenant.models:
        return None
    names: set[str] = set()
    for name in tenant.models:
        if name in registry.routes:
            names.add(name)
            continue
        for model_id, spec in registry.models.items():
            if name == model_id or name in spec.aliases:
                names.update([model_id, *spec.aliases])
    return frozenset(names)


def authenticate(headers: Mapping[str, str], registry: Registry) -> Caller:
    """The caller of a request. 401 when tenants are configured and the key is missing or unknown."""
    if not registry.tenants:
        return Caller()
    key = presented_key(headers)
    if key is None:
        raise Unauthorized("no API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    name = _match(key_sha256(key), _tenant_hashes(registry))
    if name is None:
        raise Unauthorized("invalid API key")
    tenant = registry.tenants[name]
    return Caller(tenant=name, weight=tenant.priority, models=allowed_names(registry, tenant))


def may_use(caller: Caller, model_id: str) -> bool:
    return caller.models is None or model_id in caller.models


def check_model_access(caller: Caller, name: str, registry: Registry) -> None:
    """404 for a model (or route) the caller may not use, exactly as for a name that does not exist, and
    the 404 lists only the caller's own names: another tenant's models and routes are never revealed, not
    even that they exist."""
    if caller.models is None or name in caller.models:
        return
    raise NotFound(f"model {name!r} not found; available: {', '.join(sorted(caller.models))}")


def require_admin(request, registry: Registry) -> None:
    """Admin endpoints take the separate admin key (`admin_api_key_sha256`). 401 without a valid key,
    403 for a tenant's key or when no admin key is configured (open single-user mode excepted)."""
    hashes = key_hashes(registry.admin_api_key_sha256)
    if not hashes:
        if not registry.tenants:
            return  # open single-user mode: whoever can reach the gateway administers it
        raise Forbidden("admin endpoints are disabled: set admin_api_key_sha256 in the registry")
    key = presented_key(request.headers)
    if key is None:
        raise Unauthorized("admin endpoint: send the admin key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    digest = key_sha256(key)
    if _match(digest, [(h, True) for h in hashes]):
        return
    if _match(digest, _tenant_hashes(registry)) is not None:
        raise Forbidden("admin endpoint: this is a tenant key, not the admin key")
    raise Unauthorized("invalid API key")
