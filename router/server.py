"""Building the whole server from Settings: zoo, admin key, engines, quotas, metrics, usage, jobs."""

from __future__ import annotations

from typing import NamedTuple

from fastapi import FastAPI

from blockzoo.settings import Settings
from blockzoo.zoo_factory import open_zoo
from router.admin_key import resolve_admin_key
from router.app import create_app
from router.drain import Drain, DrainMiddleware
from router.inference import InferenceService
from router.jobs import build_jobs
from router.metrics import Metrics
from router.quotas import build_quotas
from router.routes_admin import admin_router
from router.routes_health import router as health_router
from router.routes_models import models_router
from router.routes_usage import usage_router
from router.services import Services
from router.uploads import UploadLimits
from router.usage import UsageRecorder
from router.usage_buffer import UsageBuffer


class BuiltServer(NamedTuple):
    """The app plus what the CLI prints at start: a freshly generated admin key, if any."""

    app: FastAPI
    new_admin_key: str | None
    inference: InferenceService


def build_server(settings: Settings) -> BuiltServer:
    zoo = open_zoo(settings)
    digest, new_key = resolve_admin_key(settings.admin_key, settings.data_dir)
    inference = InferenceService(settings, zoo, max_loaded_models=settings.max_loaded_models)
    jobs = build_jobs(settings, zoo)
    quotas = build_quotas(settings)
    metrics = Metrics()
    drain = Drain()

    def refresh_metrics() -> None:
        stats = inference.stats()
        metrics.set_engine_stats(
            running=stats.num_running,
            waiting=stats.num_waiting,
            kv_usage=stats.kv_usage,
            resident_bytes=inference.resident_bytes(),
            preemptions_total=stats.num_preemptions,
            prefix_queries_total=stats.prefix_queries,
            prefix_hits_total=stats.prefix_hits,
            cross_model_kv_hits_total=stats.cross_model_kv_hits,
        )
        residency = inference.residency.stats
        metrics.set_residency_stats(residency.hits, residency.misses, residency.load_seconds)
        metrics.set_kv_pages(stats.num_free_pages, stats.num_total_pages)
        metrics.set_quota_stats(quotas.held_leases(), getattr(quotas, "fallbacks", 0))

    usage = UsageBuffer(UsageRecorder(zoo), settings.usage_flush_interval_s)
    usage.start()
    limits = UploadLimits(
        max_file_bytes=settings.max_upload_file_bytes, max_upload_bytes=settings.max_upload_bytes
    )
    app = create_app(
        Services(settings, zoo, digest),
        inference,
        routers=[
            health_router,
            admin_router(settings.register_paths),
            models_router(settings.register_paths, limits),
            usage_router(),
        ],
        state={
            "quotas": quotas,
            "metrics": metrics,
            "usage": usage,
            "jobs": jobs,
            "refresh_metrics": refresh_metrics,
            "drain": drain,
        },
        on_shutdown=[jobs.shutdown, usage.close],
        async_on_shutdown=[quotas.close],
    )
    # Outermost, so that a drain refuses new requests before any other work is done for them.
    app.add_middleware(DrainMiddleware, drain=drain)
    return BuiltServer(app, new_key, inference)
