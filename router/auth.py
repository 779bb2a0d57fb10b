"""Bearer-key authentication: tenant keys (`bz-…`, stored hashed) and the admin key."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from router.catalog_cache import key_digest
from router.errors import APIError
from router.principal import Principal
from router.services import Services, get_services
from zoo.catalog.tenants import authenticate


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            code="missing_api_key",
        )
    return token.strip()


def _lookup(services: Services, key: str) -> Principal | None:
    with services.zoo.sessions() as session, session.begin():
        tenant = authenticate(session, key)
        if tenant is None:
            return None
        return Principal(
            tenant.id,
            tenant.name,
            tenant.requests_per_minute,
            tenant.tokens_per_minute,
            tenant.max_concurrent,
            tenant.max_models,
            tenant.max_storage_bytes,
        )


async def require_tenant(request: Request, services: Annotated[Services, Depends(get_services)]) -> Principal:
    key = _bearer(request)
    cache = services.catalog_cache
    principal = cache.principal(key)
    if principal is not None:
        return principal
    generation = cache.generation
    principal = await run_in_threadpool(
        services.last_principals.lookup, key_digest(key), lambda: _lookup(services, key)
    )
    if principal is None:
        raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
    cache.put_principal(key, principal, generation)
    return principal


def admin_key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def admin_key_matches(expected_sha256: bytes, presented: str) -> bool:
    # Digests have a fixed length, so the constant-time comparison leaks nothing about the key.
    return hmac.compare_digest(expected_sha256, admin_key_digest(presented))


async def require_admin(request: Request, services: Annotated[Services, Depends(get_services)]) -> None:
    key = _bearer(request)
    if not admin_key_matches(services.admin_key_sha256, key):
        raise APIError(401, "invalid admin key", "authentication_error", code="invalid_api_key")


TenantDep = Annotated[Principal, Depends(require_tenant)]
AdminDep = Annotated[None, Depends(require_admin)]
ServicesDep = Annotated[Services, Depends(get_services)]
