"""Registration jobs: a zoo registration run in a worker thread, its progress recorded in the catalog.

A job is a `registration_jobs` row (queued → running → succeeded | failed) that the API and the UI
poll. The worker owns the job's staging folder and removes it when the job ends, whatever the outcome.
The zoo guarantees that a failed registration stores nothing, so a failed job leaves no trace but its row.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, NamedTuple

from fastapi import Depends, Request
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from blockzoo.settings import Settings
from router.errors import APIError, is_database_unavailable
from router.schemas import JobOut
from runtime.errors import BlockZooError
from zoo.catalog.database import is_sqlite
from zoo.catalog.models import AuditLog, Model, RegistrationJob
from zoo.catalog.tenants import TenantError
from zoo.catalog.types import JobStatus
from zoo.registry import Progress, Zoo
from zoo.reports import RegistrationReport, tenant_view

log = logging.getLogger(__name__)

Task = Callable[[Progress], RegistrationReport]
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
# Where each zoo stage falls in the job's overall progress; stages a registration skips are jumped over.
STAGES = {
    "hashing blocks": (0.0, 0.3),
    "comparing layers": (0.3, 0.6),
    "measuring effect": (0.6, 0.8),
    "writing blocks": (0.8, 0.99),
}
PROGRESS_INTERVAL_S = 0.25
# Recording a job's end through a catalog outage: first retry after this, doubling up to the max, for
# at most FINISH_RETRY_FOR_S (then the next process start's recovery settles the row).
FINISH_RETRY_FIRST_S = 0.25
FINISH_RETRY_MAX_DELAY_S = 10.0
FINISH_RETRY_FOR_S = 600.0
INCOMING_MAX_AGE_S = 24 * 3600


class JobOwner(NamedTuple):
    """Who a job acts for: `tenant_id` None for admin jobs (bases)."""

    tenant_id: int | None
    actor: str


def write_audit(
    zoo: Zoo,
    owner: JobOwner,
    action: str,
    model: str | None,
    status: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit row in its own transaction (blocking)."""
    with zoo.sessions() as session, session.begin():
        session.add(
            AuditLog(
                tenant_id=owner.tenant_id,
                actor=owner.actor,
                action=action,
                model_name=model,
                status=status,
                detail_json=detail,
            )
        )


def job_out(row: RegistrationJob, admin: bool = False) -> JobOut:
    """The job as its owner sees it; with `admin`, the report keeps the zoo-wide dedup figures."""
    detail = row.detail_json or {}
    running = row.status in ACTIVE
    report = None
    if row.status == JobStatus.SUCCEEDED:
        report = detail if admin else tenant_view(detail)
    return JobOut(
        id=row.id,
        status=row.status.value,
        progress=row.progress,
        stage=str(detail.get("stage")) if running and detail.get("stage") else None,
        model=row.model_name,
        error=row.error,
        report=report,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


# An absolute path: one or more "/name" steps not preceded by a word character.
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:/[^\s'\"`:,;()\[\]{}/]+)+/?")


def redact_paths(message: str) -> str:
    """`message` with every absolute path cut to its last component: errors of the zoo and the
    runtime name the files they read, and those live in server folders the tenant must not learn."""
    return _ABS_PATH.sub(lambda m: m.group().rstrip("/").rsplit("/", 1)[-1] or "<path>", message)


def failure_message(exc: BaseException) -> str:
    """What a failed job tells its owner: the domain error's own words, without server paths, never a
    traceback."""
    if isinstance(exc, BlockZooError | TenantError):
        return redact_paths(str(exc)) or type(exc).__name__
    if isinstance(exc, OSError):
        return f"could not read or write the model files: {exc.strerror or 'I/O error'}"
    return f"internal error during registration ({type(exc).__name__}); see the server log"


class _Tracker:
    """The progress callback: maps zoo stages onto 0..1 and writes at most every PROGRESS_INTERVAL_S."""

    def __init__(self, zoo: Zoo, job_id: int) -> None:
        self.zoo = zoo
        self.job_id = job_id
        self.progress = 0.0
        self.stage = ""
        self.written_at = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        low, high = STAGES.get(stage, (self.progress, self.progress))
        value = min(max(self.progress, low + (high - low) * min(max(fraction, 0.0), 1.0)), 1.0)
        now = time.monotonic()
        if stage == self.stage and now - self.written_at < PROGRESS_INTERVAL_S:
            self.progress = value
            return
        self.progress, self.stage, self.written_at = value, stage, now
        with self.zoo.sessions() as session, session.begin():
            session.execute(
                update(RegistrationJob)
                .where(RegistrationJob.id == self.job_id)
                .values(progress=value, detail_json={"stage": stage})
            )


class JobRunner:
    """Creates registration jobs and runs them on a small thread pool it owns."""

    def __init__(self, zoo: Zoo, uploads_dir: Path, max_workers: int = 1) -> None:
        self.zoo = zoo
        self.uploads_dir = Path(uploads_dir)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="blockzoo-register")
        self._futures: dict[int, Future[None]] = {}
        self._closing = threading.Event()

    # -- staging folders -------------------------------------------------------------------------

    def incoming_dir(self) -> Path:
        """A fresh (not yet created) folder for an upload that has no job yet."""
        return self.uploads_dir / f"incoming-{uuid.uuid4().hex}"

    def staging_dir(self, job_id: int) -> Path:
        return self.uploads_dir / str(job_id)

    # -- the job lifecycle (blocking: call from a worker thread) ---------------------------------

    def create(self, owner: JobOwner, model_name: str) -> int:
        with self.zoo.sessions() as session, session.begin():
            return self.create_in(session, owner, model_name)

    @staticmethod
    def create_in(session: Session, owner: JobOwner, model_name: str) -> int:
        """Add a queued job in the caller's transaction (so quota checks and creation are one step)."""
        row = RegistrationJob(
            tenant_id=owner.tenant_id, actor=owner.actor, model_name=model_name, status=JobStatus.QUEUED
        )
        session.add(row)
        session.flush()
        return row.id

    def adopt(self, job_id: int, incoming: Path) -> Path:
        """Move an upload into the job's staging folder; the job fails if that is impossible."""
        staging = self.staging_dir(job_id)
        try:
            incoming.rename(staging)
        except OSError as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            self._finish(job_id, None, failure_message(exc))
            raise
        return staging

    def start(self, job_id: int, task: Task, staging: Path | None, owner: JobOwner, action: str) -> None:
        """Queue `task` for the worker; `staging` (if any) is removed when it ends.

        After `shutdown` the job fails at once and the caller gets a 503 (the server is stopping)."""
        try:
            future = self._pool.submit(self._run, job_id, task, staging, owner, action)
        except RuntimeError as exc:  # the pool was shut down
            self._finish(job_id, None, "the server shut down before the job ran", owner, action)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise APIError(
                503, "the server is shutting down; try again shortly", "server_error", code="shutting_down"
            ) from exc
        self._futures[job_id] = future
        future.add_done_callback(lambda _: self._futures.pop(job_id, None))

    def get(self, job_id: int, tenant_id: int | None) -> JobOut | None:
        """The job, if it exists and belongs to `tenant_id` (None: any job, for the admin)."""
        with self.zoo.sessions() as session:
            row = session.get(RegistrationJob, job_id)
            if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
                return None
            return job_out(row, admin=tenant_id is None)

    def list(self, tenant_id: int | None, limit: int = 50) -> list[JobOut]:
        """Recent jobs of `tenant_id` (None: of everyone), newest first."""
        query = select(RegistrationJob).order_by(RegistrationJob.id.desc()).limit(limit)
        if tenant_id is not None:
            query = query.where(RegistrationJob.tenant_id == tenant_id)
        with self.zoo.sessions() as session:
            return [job_out(row, admin=tenant_id is None) for row in session.scalars(query)]

    def wait(self, job_id: int, timeout: float | None = None) -> None:
        """Block until the job has ended (if this runner runs it); for tests and the CLI."""
        future = self._futures.get(job_id)
        if future is not None:
            future.result(timeout)

    def _run(self, job_id: int, task: Task, staging: Path | None, owner: JobOwner, action: str) -> None:
        try:
            with self.zoo.sessions() as session, session.begin():
                session.execute(
                    update(RegistrationJob)
                    .where(RegistrationJob.id == job_id)
                    .values(status=JobStatus.RUNNING, detail_json={"stage": "starting"})
                )
            report = task(_Tracker(self.zoo, job_id))
        except Exception as exc:
            message = failure_message(exc)
            if not isinstance(exc, BlockZooError | TenantError | OSError):
                log.exception("registration job failed", extra={"job_id": job_id})
            self._finish(job_id, None, message, owner, action)
        else:
            self._finish(job_id, report, None, owner, action)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def _finish(
        self,
        job_id: int,
        report: RegistrationReport | None,
        error: str | None,
        owner: JobOwner | None = None,
        action: str = "model.register",
    ) -> None:
        # A job that ends while the catalog is unreachable would otherwise stay 'running' until the
        # next process start: keep trying (this is the job's own worker thread) until it answers.
        delay = FINISH_RETRY_FIRST_S
        deadline = time.monotonic() + FINISH_RETRY_FOR_S
        while True:
            try:
                self._record_end(job_id, report, error, owner, action)
                return
            except Exception as exc:
                retry = is_database_unavailable(exc) and time.monotonic() < deadline
                if not retry or self._closing.wait(delay):
                    log.error(
                        "could not record the end of a registration job",
                        extra={"job_id": job_id, "error": type(exc).__name__},
                        exc_info=not is_database_unavailable(exc),
                    )
                    return
                log.warning("catalog unavailable; retrying the end of a job", extra={"job_id": job_id})
                delay = min(delay * 2, FINISH_RETRY_MAX_DELAY_S)

    def _record_end(
        self,
        job_id: int,
        report: RegistrationReport | None,
        error: str | None,
        owner: JobOwner | None,
        action: str,
    ) -> None:
        with self.zoo.sessions() as session, session.begin():
            row = session.get(RegistrationJob, job_id)
            if row is None:  # the tenant was deleted meanwhile
                return
            if report is not None:
                row.status, row.progress, row.error = JobStatus.SUCCEEDED, 1.0, None
                row.detail_json = report.to_dict()
                row.model_id = session.scalar(
                    select(Model.id).where(
                        Model.tenant_id.is_(None)
                        if row.tenant_id is None
                        else Model.tenant_id == row.tenant_id,
                        Model.name == row.model_name,
                    )
                )
            else:
                row.status, row.detail_json = JobStatus.FAILED, None
                row.error = error or "failed"
            if owner is not None:
                session.add(
                    AuditLog(
                        tenant_id=owner.tenant_id,
                        actor=owner.actor,
                        action=action,
                        model_name=row.model_name,
                        status="ok" if report is not None else "failed",
                        detail_json={"job_id": job_id, "error": row.error}
                        if report is None
                        else {"job_id": job_id, "bytes_new": report.bytes_new},
                    )
                )

    # -- process start and stop ------------------------------------------------------------------

    def recover(self, fail_interrupted: bool) -> int:
        """Clean up after a previous process: with `fail_interrupted`, jobs it left queued or running
        fail (only right when no other process shares the catalog); stale staging folders go."""
        failed = 0
        with self.zoo.sessions() as session, session.begin():
            if fail_interrupted:
                result = session.execute(
                    update(RegistrationJob)
                    .where(RegistrationJob.status.in_(ACTIVE))
                    .values(
                        status=JobStatus.FAILED, error="interrupted: the server stopped before the job ended"
                    )
                )
                failed = int(getattr(result, "rowcount", 0) or 0)
            active = {
                str(i)
                for i in session.scalars(select(RegistrationJob.id).where(RegistrationJob.status.in_(ACTIVE)))
            }
        now = time.time()
        for entry in self.uploads_dir.iterdir():
            if entry.name.startswith("incoming-"):
                # Another process may still be receiving it, unless this one owns the catalog alone.
                stale = fail_interrupted or now - entry.stat().st_mtime > INCOMING_MAX_AGE_S
            else:
                stale = entry.name not in active
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
        return failed

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking jobs; queued ones fail (their staging goes), running ones finish when `wait`."""
        self._closing.set()
        for job_id, future in list(self._futures.items()):
            if future.cancel():
                self._finish(job_id, None, "the server shut down before the job ran")
                shutil.rmtree(self.staging_dir(job_id), ignore_errors=True)
        self._pool.shutdown(wait=wait, cancel_futures=True)


def build_jobs(settings: Settings, zoo: Zoo, max_workers: int = 1) -> JobRunner:
    """The job runner for an app; staging goes under `settings.data_dir/uploads`."""
    runner = JobRunner(zoo, settings.data_dir / "uploads", max_workers=max_workers)
    # An embedded SQLite catalog belongs to this process alone, so its unfinished jobs are orphans.
    runner.recover(fail_interrupted=is_sqlite(settings.resolved_database_url()))
    return runner


def get_jobs(request: Request) -> JobRunner:
    jobs: JobRunner = request.app.state.jobs
    return jobs


JobsDep = Annotated[JobRunner, Depends(get_jobs)]
