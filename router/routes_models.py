"""Tenant REST API for models: upload or point at a fine-tune, follow its job, list, inspect, delete.

Every route acts for the calling tenant only: another tenant's model or job is answered 404, as if it
did not exist. Changes, and refused uploads, go to the audit log.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from router.auth import ServicesDep, TenantDep
from router.errors import APIError, from_domain
from router.jobs import ACTIVE, JobOwner, JobRunner, JobsDep, Task, write_audit
from router.path_import import copy_into_staging
from router.principal import Principal
from router.schemas import (
    JOB_LINKS,
    MAX_SUBSTITUTE_WITHIN,
    UPLOAD_DOC,
    ChainEntryOut,
    Dedup,
    Deleted,
    DeltaOut,
    FineTuneFromPath,
    JobId,
    JobOut,
    ListOf,
    ModelDetail,
    ModelOut,
)
from router.uploads import (
    UploadLimits,
    bad_upload,
    check_model_folder,
    gguf_in,
    receive_upload,
    resolve_allowed_dir,
)
from runtime.errors import BlockZooError
from zoo.catalog.models import BaseModel, Block, ChainEntryDelta, Delta, Model, RegistrationJob, Tenant
from zoo.catalog.models import ChainEntry as ChainEntryRow
from zoo.catalog.types import ModelKind
from zoo.errors import DuplicateNameError, NotFoundError
from zoo.finetune_plan import FineTuneOptions
from zoo.names import check_not_a_base_name, validate_model_name
from zoo.registry import Progress, Zoo
from zoo.reports import RegistrationReport

FORM_FIELDS = ("name", "base", "substitute_within", "compress_delta", "dequantize")
_TRUE = ("1", "true", "yes", "on")
_BOOL = (*_TRUE, "0", "false", "no", "off", "")


def quota_error(message: str) -> APIError:
    return APIError(429, message, "insufficient_quota", code="quota_exceeded")


def check_quotas(session: Session, principal: Principal) -> None:
    """429 when the tenant may not register another model: counts and storage before any upload."""
    tid = principal.tenant_id
    if principal.max_models is not None:
        models = session.scalar(select(func.count()).select_from(Model).where(Model.tenant_id == tid)) or 0
        pending = session.scalar(
            select(func.count())
            .select_from(RegistrationJob)
            .where(RegistrationJob.tenant_id == tid, RegistrationJob.status.in_(ACTIVE))
        )
        if models + (pending or 0) >= principal.max_models:
            raise quota_error(
                f"model quota exceeded: {models} model(s) registered and {pending} registering, "
                f"max_models is {principal.max_models}"
            )
    if principal.max_storage_bytes is not None:
        used = session.scalar(
            select(func.coalesce(func.sum(Model.stored_bytes_new), 0)).where(Model.tenant_id == tid)
        )
        if int(used or 0) >= principal.max_storage_bytes:
            raise quota_error(
                f"storage quota exceeded: {used} bytes stored, max_storage_bytes is {principal.max_storage_bytes}"
            )


def _check_name_free(session: Session, tenant_id: int, name: str) -> None:
    try:
        check_not_a_base_name(session, name)
    except DuplicateNameError as exc:
        raise APIError(409, str(exc), param="name", code="conflict") from exc
    if session.scalar(select(Model.id).where(Model.tenant_id == tenant_id, Model.name == name)) is not None:
        raise APIError(409, f"you already have a model named {name!r}", param="name", code="conflict")
    running = session.scalar(
        select(RegistrationJob.id).where(
            RegistrationJob.tenant_id == tenant_id,
            RegistrationJob.model_name == name,
            RegistrationJob.status.in_(ACTIVE),
        )
    )
    if running is not None:
        raise APIError(409, f"model {name!r} is already being registered (job {running})", code="conflict")


def _options(kind: str, substitute_within: float | None, compress_delta: bool) -> FineTuneOptions | None:
    if substitute_within is None and not compress_delta:
        return None
    if kind not in ("full", "gguf"):
        raise bad_upload("substitute_within and compress_delta apply to full checkpoints, not to adapters")
    return FineTuneOptions(substitute_within=substitute_within, compress_delta=compress_delta)


def _flag(fields: dict[str, str], name: str) -> bool:
    flag = fields.get(name, "").strip().lower()
    if flag not in _BOOL:
        raise bad_upload(f"{name} must be true or false", name)
    return flag in _TRUE


def _dequantize(kind: str, asked: bool) -> bool:
    if asked and kind != "gguf":
        raise bad_upload("dequantize applies to a GGUF file, not to a checkpoint folder", "dequantize")
    return asked


def _parse_form(fields: dict[str, str]) -> tuple[str, str | None, float | None, bool]:
    unknown = sorted(set(fields) - set(FORM_FIELDS))
    if unknown:
        raise bad_upload(f"unknown form field(s) {', '.join(unknown)}; expected {', '.join(FORM_FIELDS)}")
    name = fields.get("name", "").strip()
    if not name:
        raise bad_upload("the form field 'name' (the new model's name) is required", "name")
    validate_model_name(name)
    base = fields.get("base", "").strip() or None
    substitute: float | None = None
    if fields.get("substitute_within", "").strip():
        try:
            substitute = float(fields["substitute_within"])
        except ValueError as exc:
            raise bad_upload("substitute_within must be a number", "substitute_within") from exc
        if not 0 < substitute <= MAX_SUBSTITUTE_WITHIN:
            raise bad_upload(
                f"substitute_within must be above 0 and at most {MAX_SUBSTITUTE_WITHIN}", "substitute_within"
            )
    return name, base, substitute, _flag(fields, "compress_delta")


def _accept(zoo: Zoo, jobs: JobRunner, principal: Principal, name: str, source: str) -> int:
    """Quota and name checks plus the job row, in one transaction; the job is audited as accepted."""
    owner = _owner(principal)
    with zoo.sessions() as session, session.begin():
        check_quotas(session, principal)
        _check_name_free(session, principal.tenant_id, name)
        job_id = jobs.create_in(session, owner, name)
    write_audit(zoo, owner, "fine_tune.create", name, "accepted", {"job_id": job_id, "source": source})
    return job_id


def _owner(principal: Principal) -> JobOwner:
    return JobOwner(principal.tenant_id, f"tenant:{principal.tenant}")


def _task(
    zoo: Zoo,
    tenant: str,
    name: str,
    folder: Path,
    base: str | None,
    options: FineTuneOptions | None,
    dequantize: bool = False,
) -> Task:
    # A GGUF fine-tune is registered from its one file inside the staged folder.
    source = gguf_in(folder) or folder

    def run(progress: Progress) -> RegistrationReport:
        return zoo.register(
            tenant, name, source, base=base, progress=progress, options=options, dequantize=dequantize
        )

    return run


def models_router(allowed_paths: Sequence[Path], limits: UploadLimits) -> APIRouter:
    """The tenant model routes under /v1; `allowed_paths` bounds from-path registration."""
    router = APIRouter(prefix="/v1", tags=["fine-tunes"])
    roots = [Path(p) for p in allowed_paths]

    @router.post(
        "/fine-tunes", status_code=202, response_model=JobOut, openapi_extra={**UPLOAD_DOC, **_JOB_LINKS}
    )
    async def upload_fine_tune(
        request: Request, principal: TenantDep, services: ServicesDep, jobs: JobsDep
    ) -> JobOut:
        zoo = services.zoo
        incoming = jobs.incoming_dir()
        try:
            await run_in_threadpool(_quota_only, zoo, principal)
            received = await receive_upload(request, incoming, limits)
            try:
                name, base, substitute, compress = _parse_form(received.fields)
                kind = await run_in_threadpool(check_model_folder, incoming)
                options = _options(kind, substitute, compress)
                dequantize = _dequantize(kind, _flag(received.fields, "dequantize"))
                job_id = await run_in_threadpool(_accept, zoo, jobs, principal, name, "upload")
            except BaseException:
                await run_in_threadpool(shutil.rmtree, incoming, True)
                raise
        except (APIError, BlockZooError) as exc:
            await run_in_threadpool(_audit_rejection, zoo, principal, exc)
            raise
        staging = await run_in_threadpool(jobs.adopt, job_id, incoming)
        task = _task(zoo, principal.tenant, name, staging, base, options, dequantize)
        jobs.start(job_id, task, staging, _owner(principal), "model.register")
        return await run_in_threadpool(_job_now, jobs, job_id, principal)

    @router.post("/fine-tunes/from-path", status_code=202, response_model=JobOut, openapi_extra=_JOB_LINKS)
    def register_from_path(
        body: FineTuneFromPath, principal: TenantDep, services: ServicesDep, jobs: JobsDep
    ) -> JobOut:
        zoo = services.zoo
        incoming = jobs.incoming_dir()
        try:
            _quota_only(zoo, principal)
            validate_model_name(body.name)
            folder = resolve_allowed_dir(body.path, roots)
            # The job reads the checked copy, never the tenant's folder (which may change meanwhile).
            copy_into_staging(folder, roots, incoming, limits)
            try:
                kind = check_model_folder(incoming)
                options = _options(kind, body.substitute_within, body.compress_delta)
                dequantize = _dequantize(kind, body.dequantize)
                job_id = _accept(zoo, jobs, principal, body.name, "path")
            except BaseException:
                shutil.rmtree(incoming, ignore_errors=True)
                raise
        except (APIError, BlockZooError) as exc:
            _audit_rejection(zoo, principal, exc)
            raise
        staging = jobs.adopt(job_id, incoming)
        task = _task(zoo, principal.tenant, body.name, staging, body.base, options, dequantize)
        jobs.start(job_id, task, staging, _owner(principal), "model.register")
        return _job_now(jobs, job_id, principal)

    @router.get("/jobs", response_model=ListOf[JobOut])
    def list_jobs(
        principal: TenantDep, jobs: JobsDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
    ) -> ListOf[JobOut]:
        return ListOf[JobOut](data=jobs.list(principal.tenant_id, limit))

    @router.get("/jobs/{job_id}", response_model=JobOut)
    def get_job(job_id: JobId, principal: TenantDep, jobs: JobsDep) -> JobOut:
        job = jobs.get(job_id, principal.tenant_id)
        if job is None:
            raise APIError(404, f"job {job_id} not found", code="not_found")
        return job

    @router.get("/fine-tunes", response_model=ListOf[ModelOut])
    def list_fine_tunes(principal: TenantDep, services: ServicesDep) -> ListOf[ModelOut]:
        with services.zoo.sessions() as session:
            return ListOf[ModelOut](data=model_rows(session, tenant_id=principal.tenant_id))

    @router.get("/fine-tunes/{name}", response_model=ModelDetail)
    def get_fine_tune(name: str, principal: TenantDep, services: ServicesDep) -> ModelDetail:
        with services.zoo.sessions() as session:
            model = session.scalar(
                select(Model).where(Model.tenant_id == principal.tenant_id, Model.name == name)
            )
            if model is None:
                raise NotFoundError(f"model {name!r} not found")
            return model_detail(session, model, principal.tenant)

    @router.delete("/fine-tunes/{name}", response_model=Deleted)
    def delete_fine_tune(name: str, principal: TenantDep, services: ServicesDep) -> Deleted:
        services.zoo.delete_model(principal.tenant, name)
        write_audit(services.zoo, _owner(principal), "model.delete", name, "ok")
        return Deleted(id=name, object="model")

    return router


def _quota_only(zoo: Zoo, principal: Principal) -> None:
    with zoo.sessions() as session:
        check_quotas(session, principal)


def _audit_rejection(zoo: Zoo, principal: Principal, exc: Exception) -> None:
    err = from_domain(exc)
    detail = {"status": err.status, "error": err.message}
    write_audit(zoo, _owner(principal), "fine_tune.create", None, "rejected", detail)


def _job_now(jobs: JobRunner, job_id: int, principal: Principal) -> JobOut:
    job = jobs.get(job_id, principal.tenant_id)
    if job is None:  # the tenant was deleted in the meantime
        raise APIError(404, f"job {job_id} not found", code="not_found")
    return job


# -- views of catalog rows ---------------------------------------------------------------------------


def model_rows(session: Session, tenant_id: int | None = None, all_tenants: bool = False) -> list[ModelOut]:
    """The models of `tenant_id`, or of everyone (bases included) with `all_tenants`."""
    query = (
        select(Model, Tenant.name, BaseModel.name)
        .outerjoin(Tenant, Model.tenant_id == Tenant.id)
        .outerjoin(BaseModel, Model.base_model_id == BaseModel.id)
        .order_by(Tenant.name, Model.name)
    )
    if not all_tenants:
        query = query.where(Model.tenant_id == tenant_id)
    return [_summary(m, tenant, base) for m, tenant, base in session.execute(query)]


def _summary(model: Model, tenant: str | None, base: str | None) -> ModelOut:
    return ModelOut(
        name=model.name,
        tenant=tenant,
        kind=model.kind.value,
        status=model.status.value,
        base=None if model.kind == ModelKind.BASE else base,
        created_at=model.created_at,
        naive_bytes=model.naive_bytes,
        # A base is its own base; a fine-tune's figure is what registry charged it (zoo.tenant_charge).
        bytes_beyond_base=0 if model.kind == ModelKind.BASE else model.stored_bytes_new,
    )


def _base_blocks(session: Session, model: Model) -> set[str]:
    if model.kind == ModelKind.BASE or model.base_model_id is None:
        return set()
    base_id = session.scalar(
        select(Model.id).where(
            Model.tenant_id.is_(None),
            Model.kind == ModelKind.BASE,
            Model.base_model_id == model.base_model_id,
        )
    )
    return set(session.scalars(select(ChainEntryRow.block_id).where(ChainEntryRow.model_id == base_id)))


def model_detail(session: Session, model: Model, tenant: str | None) -> ModelDetail:
    """`model` with its chain; a block is shared when the base's chain has it too."""
    base = session.get(BaseModel, model.base_model_id) if model.base_model_id is not None else None
    shared = _base_blocks(session, model)
    deltas: dict[int, list[DeltaOut]] = {}
    delta_rows = session.execute(
        select(ChainEntryDelta.position, ChainEntryDelta.order, Delta)
        .join(Delta, ChainEntryDelta.delta_id == Delta.id)
        .where(ChainEntryDelta.model_id == model.id)
        .order_by(ChainEntryDelta.position, ChainEntryDelta.order)
    )
    for position, order, delta in delta_rows:
        deltas.setdefault(position, []).append(
            DeltaOut(
                order=order, delta_id=delta.id, kind=delta.kind.value, bytes=delta.nbytes, rank=delta.rank
            )
        )
    entries = session.execute(
        select(ChainEntryRow.position, Block)
        .join(Block, ChainEntryRow.block_id == Block.id)
        .where(ChainEntryRow.model_id == model.id)
        .order_by(ChainEntryRow.position)
    )
    chain = [
        ChainEntryOut(
            position=position,
            block_id=block.id,
            kind=block.kind.value,
            bytes=block.nbytes,
            shared_with_base=block.id in shared,
            deltas=deltas.get(position, []),
        )
        for position, block in entries
    ]
    blocks_shared = sum(1 for e in chain if e.shared_with_base)
    shared_bytes = sum(e.bytes for e in chain if e.shared_with_base)
    dedup = Dedup(
        naive_bytes=model.naive_bytes,
        bytes_shared_with_base=shared_bytes,
        bytes_beyond_base=model.naive_bytes - shared_bytes,
        blocks_total=len(chain),
        blocks_shared=blocks_shared,
        blocks_new=len(chain) - blocks_shared,
        deltas=sum(len(d) for d in deltas.values()),
    )
    summary = _summary(model, tenant, base.name if base is not None else None)
    return ModelDetail(**summary.model_dump(), chain=chain, dedup=dedup)


_JOB_LINKS: dict[str, object] = {"responses": {"202": {"links": JOB_LINKS}}}
