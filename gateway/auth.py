"""Admin authentication: the minimum the reload endpoint needs. (The tenants work owns this module;
`require_admin` keeps its name and signature there.)"""

from __future__ import annotations

import hashlib
import hmac

from litestar import Request

from gateway.config import Registry
from gateway.errors import Unauthorized


def require_admin(request: Request, registry: Registry) -> None:
    """Pass when the request carries `Authorization: Bearer <key>` whose sha256 is one of the registry's
    admin_api_key_sha256. A registry with no admin key and no tenants is an open gateway: anyone who can
    reach it may use it, admin endpoints included. With tenants but no admin key, nobody is admin."""
    configured = registry.admin_api_key_sha256
    if configured is None:
        if not registry.tenants:
            return
        raise Unauthorized("admin endpoints need admin_api_key_sha256 in the registry")
    hashes = [configured] if isinstance(configured, str) else configured
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("admin endpoint: send Authorization: Bearer <admin key>")
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    # Compare against every configured hash, without stopping early, so timing says nothing of which matched.
    matched = False
    for expected in hashes:
        matched |= hmac.compare_digest(digest, expected)
    if not matched:
        raise Unauthorized("admin endpoint: invalid admin key")
