"""A tenant's own usage, by model and UTC hour: GET /v1/usage. The admin's usage route reads through
the same query, with every tenant in view.

The tenant filter is the query's, never the caller's choice: a tenant's key selects its own rows, and
no parameter can widen that.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import Select, select

from router.auth import ServicesDep, TenantDep
from router.errors import APIError
from router.schemas import ListOf, UsageOut
from zoo.catalog.models import Model, Tenant, Usage
from zoo.registry import Zoo

# Usage rows are hours since the service existed; anything outside is a mistake, and converting far
# dates to UTC can overflow Python's datetime.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
MAX_ROWS = 10_000
TimeParam = Annotated[
    datetime | None,
    Query(description="ISO 8601 (UTC unless it says otherwise) or unix seconds; from 1970 to 2200"),
]
ModelParam = Annotated[str | None, Query(min_length=1, max_length=128, description="one model's rows only")]
LimitParam = Annotated[int, Query(ge=1, le=MAX_ROWS)]


def bounded_time(value: datetime | None, param: str) -> datetime | None:
    """`value` as an aware UTC datetime, or a 400 naming `param` when it is outside the bounds."""
    if value is None:
        return None
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if not EARLIEST <= aware <= LATEST:
        raise APIError(
            400,
            f"{param} must lie between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}",
            param=param,
            code="invalid_value",
        )
    return aware.astimezone(UTC)


def usage_query(
    tenant: str | None,
    model: str | None,
    start: datetime | None,
    end: datetime | None,
    limit: int,
    tenant_id: int | None = None,
) -> Select[Usage, str, str]:
    """Usage rows, newest hour first; `tenant_id` (a tenant's own view) or `tenant` (the admin's filter)."""
    query = (
        select(Usage, Tenant.name, Model.name)
        .join(Tenant, Usage.tenant_id == Tenant.id)
        .join(Model, Usage.model_id == Model.id)
        .order_by(Usage.hour.desc(), Tenant.name, Model.name)
        .limit(limit)
    )
    if tenant_id is not None:
        query = query.where(Usage.tenant_id == tenant_id)
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    if model is not None:
        query = query.where(Model.name == model)
    if start is not None:
        query = query.where(Usage.hour >= start)
    if end is not None:
        query = query.where(Usage.hour < end)
    return query


def read_usage(request: Request, zoo: Zoo, query: Select[Usage, str, str]) -> list[UsageOut]:
    """Flush what finished since the last periodic write, then run `query` (blocking)."""
    pending = getattr(request.app.state, "usage", None)
    if pending is not None:
        pending.flush()
    with zoo.sessions() as session:
        return [
            UsageOut(
                tenant=t,
                model=m,
                hour=u.hour,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                requests=u.requests,
            )
            for u, t, m in session.execute(query)
        ]


def usage_router() -> APIRouter:
    """GET /v1/usage for the calling tenant."""
    router = APIRouter(prefix="/v1", tags=["usage"])

    @router.get("/usage", response_model=ListOf[UsageOut])
    def tenant_usage(
        request: Request,
        principal: TenantDep,
        services: ServicesDep,
        start: TimeParam = None,
        end: TimeParam = None,
        model: ModelParam = None,
        limit: LimitParam = 1000,
    ) -> ListOf[UsageOut]:
        """Your tokens and requests per model and UTC hour, newest first; `start` inclusive, `end` exclusive."""
        since, until = bounded_time(start, "start"), bounded_time(end, "end")
        query = usage_query(None, model, since, until, limit, tenant_id=principal.tenant_id)
        return ListOf[UsageOut](data=read_usage(request, services.zoo, query))

    return router
