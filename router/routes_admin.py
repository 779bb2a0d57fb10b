"""Admin REST API under /admin/v1: tenants and their keys, base models, every model, usage, stats, gc, audit.

Every route requires the admin key. Tenant changes are audited by `zoo.catalog.tenants` itself (actor
"admin"); base-model changes and gc are audited here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from router.auth import AdminDep, ServicesDep
from router.errors import APIError
from router.jobs import ACTIVE, JobOwner, JobsDep, write_audit
from router.routes_models import model_rows
from router.routes_usage import LimitParam, ModelParam, TimeParam, bounded_time, read_usage, usage_query
from router.schemas import (
    ADMIN_JOB_LINKS,
    AuditOut,
    BaseModelOut,
    Deleted,
    GcOut,
    JobId,
    JobOut,
    KeyCreate,
    KeyCreated,
    KeyOut,
    ListOf,
    ModelOut,
    PathRegistration,
    Quotas,
    TenantCreate,
    TenantCreated,
    TenantOut,
    TenantPatch,
    UsageOut,
)
from router.uploads import bad_upload, check_model_folder, resolve_allowed_dir
from zoo.catalog import tenants as catalog
from zoo.catalog.models import AuditLog, BaseModel, Model, RegistrationJob, Tenant
from zoo.catalog.types import ModelKind
from zoo.names import validate_model_name
from zoo.stats import zoo_stats

ACTOR = "admin"
ADMIN = JobOwner(None, ACTOR)
_QUOTA_FIELDS = tuple(Quotas.model_fields)


def _tenant_out(session: Session, tenant: Tenant) -> TenantOut:
    models, storage = session.execute(
        select(func.count(Model.id), func.coalesce(func.sum(Model.stored_bytes_new), 0)).where(
            Model.tenant_id == tenant.id
        )
    ).one()
    return TenantOut(
        name=tenant.name,
        created_at=tenant.created_at,
        disabled=tenant.disabled,
        quotas=Quotas(**dataclasses.asdict(catalog.TenantQuotas.of(tenant))),
        models=int(models),
        storage_bytes=int(storage),
        active_keys=len(catalog.list_keys(session, tenant.name)),
    )


def _not_found(message: str) -> APIError:
    return APIError(404, message, code="not_found")


def admin_router(allowed_paths: Sequence[Path]) -> APIRouter:
    """The admin routes; `allowed_paths` bounds where base models may be registered from."""
    router = APIRouter(prefix="/admin/v1", tags=["admin"])
    roots = [Path(p) for p in allowed_paths]

    # -- tenants ---------------------------------------------------------------------------------

    @router.post("/tenants", status_code=201, response_model=TenantCreated)
    def create_tenant(body: TenantCreate, _: AdminDep, services: ServicesDep) -> TenantCreated:
        quotas = catalog.TenantQuotas(**body.model_dump(include=set(_QUOTA_FIELDS)))
        with services.zoo.sessions() as session, session.begin():
            tenant, key = catalog.create_tenant(session, body.name, quotas, actor=ACTOR)
            out = _tenant_out(session, tenant)
        return TenantCreated(tenant=out, api_key=key, quotas=out.quotas)

    @router.get("/tenants", response_model=ListOf[TenantOut])
    def list_tenants(_: AdminDep, services: ServicesDep) -> ListOf[TenantOut]:
        with services.zoo.sessions() as session:
            return ListOf[TenantOut](data=[_tenant_out(session, t) for t in catalog.list_tenants(session)])

    @router.get("/tenants/{name}", response_model=TenantOut)
    def get_tenant(name: str, _: AdminDep, services: ServicesDep) -> TenantOut:
        with services.zoo.sessions() as session:
            return _tenant_out(session, catalog.get_tenant(session, name))

    @router.patch("/tenants/{name}", response_model=TenantOut)
    def patch_tenant(name: str, body: TenantPatch, _: AdminDep, services: ServicesDep) -> TenantOut:
        sent = body.model_fields_set
        with services.zoo.sessions() as session, session.begin():
            tenant = catalog.get_tenant(session, name)
            changed = {f: getattr(body, f) for f in _QUOTA_FIELDS if f in sent}
            if changed:
                quotas = dataclasses.replace(catalog.TenantQuotas.of(tenant), **changed)
                tenant = catalog.set_quotas(session, name, quotas, actor=ACTOR)
            if "disabled" in sent and body.disabled is not None:
                tenant = catalog.set_disabled(session, name, body.disabled, actor=ACTOR)
            return _tenant_out(session, tenant)

    @router.delete("/tenants/{name}", response_model=Deleted)
    def delete_tenant(name: str, _: AdminDep, services: ServicesDep) -> Deleted:
        with services.zoo.sessions() as session, session.begin():
            tenant = catalog.get_tenant(session, name)
            running = session.scalar(
                select(func.count())
                .select_from(RegistrationJob)
                .where(RegistrationJob.tenant_id == tenant.id, RegistrationJob.status.in_(ACTIVE))
            )
            if running:
                raise APIError(409, f"tenant {name!r} has {running} registration(s) running", code="conflict")
            catalog.delete_tenant(session, name, actor=ACTOR)
        return Deleted(id=name, object="tenant")

    # -- keys ------------------------------------------------------------------------------------

    @router.post("/tenants/{name}/keys", status_code=201, response_model=KeyCreated)
    def create_key(name: str, body: KeyCreate, _: AdminDep, services: ServicesDep) -> KeyCreated:
        with services.zoo.sessions() as session, session.begin():
            row, key = catalog.create_key(session, name, body.name, actor=ACTOR)
            return KeyCreated(api_key=key, prefix=row.key_prefix, name=row.name, created_at=row.created_at)

    @router.get("/tenants/{name}/keys", response_model=ListOf[KeyOut])
    def list_keys(name: str, _: AdminDep, services: ServicesDep) -> ListOf[KeyOut]:
        with services.zoo.sessions() as session:
            rows = catalog.list_keys(session, name)
            return ListOf[KeyOut](
                data=[
                    KeyOut(
                        prefix=r.key_prefix, name=r.name, created_at=r.created_at, last_used_at=r.last_used_at
                    )
                    for r in rows
                ]
            )

    @router.delete("/tenants/{name}/keys/{prefix}", response_model=Deleted)
    def revoke_key(name: str, prefix: str, _: AdminDep, services: ServicesDep) -> Deleted:
        try:
            with services.zoo.sessions() as session, session.begin():
                catalog.revoke_key(session, name, prefix, actor=ACTOR)
        except catalog.ApiKeyNotFound as exc:
            raise _not_found(str(exc)) from exc
        return Deleted(id=prefix, object="api_key")

    # -- base models -----------------------------------------------------------------------------

    @router.post(
        "/base-models",
        status_code=202,
        response_model=JobOut,
        openapi_extra={"responses": {"202": {"links": ADMIN_JOB_LINKS}}},
    )
    def add_base_model(body: PathRegistration, _: AdminDep, services: ServicesDep, jobs: JobsDep) -> JobOut:
        zoo = services.zoo
        validate_model_name(body.name)
        folder = resolve_allowed_dir(body.path, roots)
        if check_model_folder(folder) != "full":
            raise bad_upload("a base model must be a full checkpoint (config.json + *.safetensors)", "path")
        with zoo.sessions() as session, session.begin():
            if session.scalar(select(BaseModel.id).where(BaseModel.name == body.name)) is not None:
                raise APIError(409, f"a base model named {body.name!r} already exists", code="conflict")
            if session.scalar(select(Model.id).where(Model.name == body.name)) is not None:
                # Tenants' /v1/models would list the id twice.
                raise APIError(409, f"a tenant's model is named {body.name!r}", param="name", code="conflict")
            job_id = jobs.create_in(session, ADMIN, body.name)
        name = body.name
        jobs.start(
            job_id, lambda progress: zoo.add_base(name, folder, progress), None, ADMIN, "base.register"
        )
        job = jobs.get(job_id, None)
        if job is None:
            raise _not_found(f"job {job_id} not found")
        return job

    @router.get("/base-models", response_model=ListOf[BaseModelOut])
    def list_base_models(_: AdminDep, services: ServicesDep) -> ListOf[BaseModelOut]:
        with services.zoo.sessions() as session:
            counts = session.execute(
                select(Model.base_model_id, func.count())
                .where(Model.kind != ModelKind.BASE)
                .group_by(Model.base_model_id)
            )
            users = {base_id: n for base_id, n in counts}
            rows = session.execute(
                select(BaseModel, Model)
                .join(Model, (Model.base_model_id == BaseModel.id) & (Model.kind == ModelKind.BASE))
                .order_by(BaseModel.name)
            )
            data = [
                BaseModelOut(
                    name=base.name,
                    architecture=base.architecture,
                    status=model.status.value,
                    created_at=base.created_at,
                    naive_bytes=model.naive_bytes,
                    fine_tunes=int(users.get(base.id, 0)),
                )
                for base, model in rows
            ]
        return ListOf[BaseModelOut](data=data)

    @router.delete("/base-models/{name}", response_model=Deleted)
    def delete_base_model(name: str, _: AdminDep, services: ServicesDep) -> Deleted:
        with services.zoo.sessions() as session:
            base_id = session.scalar(select(BaseModel.id).where(BaseModel.name == name))
            if base_id is None:
                raise _not_found(f"no base model named {name!r}")
            users = session.scalar(
                select(func.count())
                .select_from(Model)
                .where(Model.base_model_id == base_id, Model.kind != ModelKind.BASE)
            )
        if users:
            raise APIError(
                409, f"base {name!r} still has {users} fine-tune(s) registered on it", code="conflict"
            )
        services.zoo.delete_model(None, name)
        write_audit(services.zoo, ADMIN, "base.delete", name, "ok")
        return Deleted(id=name, object="base_model")

    # -- jobs, models, usage, stats, gc, audit ---------------------------------------------------

    @router.get("/jobs", response_model=ListOf[JobOut])
    def list_jobs(
        _: AdminDep, jobs: JobsDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
    ) -> ListOf[JobOut]:
        return ListOf[JobOut](data=jobs.list(None, limit))

    @router.get("/jobs/{job_id}", response_model=JobOut)
    def get_job(job_id: JobId, _: AdminDep, jobs: JobsDep) -> JobOut:
        job = jobs.get(job_id, None)
        if job is None:
            raise _not_found(f"job {job_id} not found")
        return job

    @router.get("/models", response_model=ListOf[ModelOut])
    def list_models(_: AdminDep, services: ServicesDep) -> ListOf[ModelOut]:
        with services.zoo.sessions() as session:
            return ListOf[ModelOut](data=model_rows(session, all_tenants=True))

    @router.get("/usage", response_model=ListOf[UsageOut])
    def usage(
        _: AdminDep,
        request: Request,
        services: ServicesDep,
        tenant: Annotated[str | None, Query(max_length=63)] = None,
        since: TimeParam = None,
        until: TimeParam = None,
        model: ModelParam = None,
        limit: LimitParam = 1000,
    ) -> ListOf[UsageOut]:
        query = usage_query(tenant, model, bounded_time(since, "since"), bounded_time(until, "until"), limit)
        return ListOf[UsageOut](data=read_usage(request, services.zoo, query))

    @router.get("/stats")
    def stats(_: AdminDep, services: ServicesDep) -> dict[str, Any]:
        return zoo_stats(services.zoo)

    @router.post("/gc", response_model=GcOut)
    def gc(_: AdminDep, services: ServicesDep) -> GcOut:
        report = services.zoo.gc()
        write_audit(services.zoo, ADMIN, "zoo.gc", None, "ok", report._asdict())
        return GcOut(**report._asdict())

    @router.get("/audit", response_model=ListOf[AuditOut])
    def audit(
        _: AdminDep,
        services: ServicesDep,
        tenant: str | None = None,
        action: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ListOf[AuditOut]:
        query = (
            select(AuditLog, Tenant.name)
            .outerjoin(Tenant, AuditLog.tenant_id == Tenant.id)
            .order_by(AuditLog.ts.desc(), AuditLog.id.desc())
            .limit(limit)
        )
        if tenant is not None:
            query = query.where(Tenant.name == tenant)
        if action is not None:
            query = query.where(AuditLog.action == action)
        with services.zoo.sessions() as session:
            data = [
                AuditOut(
                    id=row.id,
                    ts=row.ts,
                    tenant=name,
                    actor=row.actor,
                    action=row.action,
                    model=row.model_name,
                    status=row.status,
                    detail=row.detail_json,
                )
                for row, name in session.execute(query)
            ]
        return ListOf[AuditOut](data=data)

    return router
