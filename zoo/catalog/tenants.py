"""Tenants and their API keys.

The functions take a `Session` and leave the transaction to the caller: they flush (so ids exist and
constraint errors surface here) but never commit. Each change is also written to the audit log.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from zoo.catalog import keys
from zoo.catalog.models import ApiKey, AuditLog, Model, Tenant
from zoo.catalog.types import utcnow

TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# last_used_at is informational; writing it on every request would turn each read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class TenantError(Exception):
    """Base of the errors of this module; their messages are fit to show to an operator."""


class InvalidTenantName(TenantError, ValueError):
    """The tenant name does not match `TENANT_NAME_RE`."""


class InvalidQuota(TenantError, ValueError):
    """A quota is negative or too large to store."""


class TenantExists(TenantError):
    """A tenant with that name already exists."""


class TenantNotFound(TenantError, LookupError):
    """No tenant has that name."""


class TenantHasModels(TenantError):
    """The tenant still owns models, which must be deleted through the zoo first."""


class ApiKeyNotFound(TenantError, LookupError):
    """No active key of the tenant has that prefix."""


@dataclass(frozen=True)
class TenantQuotas:
    """Per-tenant limits; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    max_models: int | None = None
    max_storage_bytes: int | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # Past these the catalog's integer columns overflow (32-bit, or 64-bit for bytes).
            limit = 2**53 if field.name == "max_storage_bytes" else 2**31 - 1
            if value is not None and not 0 <= value <= limit:
                raise InvalidQuota(f"quota {field.name} must be from 0 to {limit} or unlimited, got {value}")

    @classmethod
    def of(cls, tenant: Tenant) -> TenantQuotas:
        """The quotas stored on `tenant`."""
        return cls(**{field.name: getattr(tenant, field.name) for field in fields(cls)})


def validate_tenant_name(name: str) -> str:
    """`name` if it is a valid tenant name, else `InvalidTenantName` saying what is allowed."""
    if not TENANT_NAME_RE.fullmatch(name):
        raise InvalidTenantName(
            f"invalid tenant name {name!r}: use 1-63 characters from a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def _audit(
    session: Session, actor: str, action: str, tenant: Tenant | None, detail: dict[str, Any] | None = None
) -> None:
    session.add(
        AuditLog(
            actor=actor,
            action=action,
            tenant_id=tenant.id if tenant is not None else None,
            status="ok",
            detail_json=detail,
        )
    )


def _new_key(tenant: Tenant, name: str | None) -> tuple[ApiKey, str]:
    plaintext = keys.generate_key()
    row = ApiKey(
        tenant=tenant, key_prefix=keys.key_prefix(plaintext), key_hash=keys.hash_key(plaintext), name=name
    )
    return row, plaintext


def create_tenant(
    session: Session,
    name: str,
    quotas: TenantQuotas | None = None,
    key_name: str | None = "default",
    actor: str = "system",
) -> tuple[Tenant, str]:
    """Create tenant `name` with a first API key; returns the tenant and the key's plaintext.

    Raises `InvalidTenantName` or `TenantExists`. When another writer creates the same name at the
    same moment, the unique constraint catches it: the session is then rolled back.
    """
    validate_tenant_name(name)
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise TenantExists(f"tenant {name!r} already exists")
    tenant = Tenant(name=name, disabled=False, **asdict(quotas or TenantQuotas()))
    session.add(tenant)
    api_key, plaintext = _new_key(tenant, key_name)
    session.add(api_key)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise TenantExists(f"tenant {name!r} already exists") from exc
    _audit(session, actor, "tenant.create", tenant, {"key_prefix": api_key.key_prefix})
    return tenant, plaintext


def get_tenant(session: Session, name: str) -> Tenant:
    """The tenant called `name`, or `TenantNotFound`."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise TenantNotFound(f"no tenant named {name!r}")
    return tenant


def list_tenants(session: Session) -> list[Tenant]:
    """Every tenant, by name."""
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def set_quotas(session: Session, name: str, quotas: TenantQuotas, actor: str = "system") -> Tenant:
    """Replace the quotas of tenant `name`."""
    tenant = get_tenant(session, name)
    values = asdict(quotas)
    for field, value in values.items():
        setattr(tenant, field, value)
    _audit(session, actor, "tenant.quotas", tenant, values)
    session.flush()
    return tenant


def set_disabled(session: Session, name: str, disabled: bool, actor: str = "system") -> Tenant:
    """Disable (no key authenticates) or re-enable tenant `name`."""
    tenant = get_tenant(session, name)
    tenant.disabled = disabled
    _audit(session, actor, "tenant.disable" if disabled else "tenant.enable", tenant)
    session.flush()
    return tenant


def delete_tenant(session: Session, name: str, actor: str = "system") -> None:
    """Delete tenant `name` with its keys, usage and jobs; `TenantHasModels` while it owns models."""
    tenant = get_tenant(session, name)
    owned = session.scalar(select(func.count()).select_from(Model).where(Model.tenant_id == tenant.id))
    if owned:
        raise TenantHasModels(f"tenant {name!r} still owns {owned} model(s); delete them first")
    _audit(session, actor, "tenant.delete", None, {"tenant": name})
    session.delete(tenant)
    session.flush()


def create_key(
    session: Session, tenant_name: str, name: str | None = None, actor: str = "system"
) -> tuple[ApiKey, str]:
    """A new API key for tenant `tenant_name`; returns its row and its plaintext (shown once)."""
    tenant = get_tenant(session, tenant_name)
    api_key, plaintext = _new_key(tenant, name)
    session.add(api_key)
    session.flush()
    _audit(session, actor, "key.create", tenant, {"key_prefix": api_key.key_prefix})
    return api_key, plaintext


def list_keys(session: Session, tenant_name: str, include_revoked: bool = False) -> list[ApiKey]:
    """The keys of tenant `tenant_name`, oldest first."""
    tenant = get_tenant(session, tenant_name)
    query = select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_key(session: Session, tenant_name: str, prefix: str, actor: str = "system") -> list[ApiKey]:
    """Revoke the active keys of tenant `tenant_name` whose prefix is `prefix`; `ApiKeyNotFound` if none."""
    tenant = get_tenant(session, tenant_name)
    rows = list(
        session.scalars(
            select(ApiKey).where(
                ApiKey.tenant_id == tenant.id, ApiKey.key_prefix == prefix, ApiKey.revoked_at.is_(None)
            )
        )
    )
    if not rows:
        raise ApiKeyNotFound(f"tenant {tenant_name!r} has no active key with prefix {prefix!r}")
    now = utcnow()
    for row in rows:
        row.revoked_at = now
    _audit(session, actor, "key.revoke", tenant, {"key_prefix": prefix})
    session.flush()
    return rows


def authenticate(session: Session, key: str, now: datetime | None = None) -> Tenant | None:
    """The enabled tenant owning active key `key`, or None; records when the key was last used."""
    if not keys.is_well_formed(key):
        return None
    candidates = session.scalars(
        select(ApiKey)
        .join(Tenant)
        .where(ApiKey.key_prefix == keys.key_prefix(key), ApiKey.revoked_at.is_(None))
    )
    for row in candidates:
        if not keys.matches(key, row.key_hash):
            continue
        tenant = row.tenant
        if tenant.disabled:
            return None
        moment = now or utcnow()
        if row.last_used_at is None or moment - row.last_used_at >= LAST_USED_RESOLUTION:
            row.last_used_at = moment
            session.flush()
        return tenant
    return None
