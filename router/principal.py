"""Who a tenant request acts for, as authentication found it."""

from __future__ import annotations

from typing import NamedTuple


class Principal(NamedTuple):
    """The tenant a request acts for, with its quota limits (None = unlimited)."""

    tenant_id: int
    tenant: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None
    max_models: int | None
    max_storage_bytes: int | None
