"""Probes and metrics, without authentication: GET /health, GET /ready, GET /metrics.

/health answers whenever the process serves (liveness); its status is "draining" once a SIGTERM
started a drain. /ready also needs the catalog to answer `SELECT 1`, no drain in progress, and the
optional `app.state.ready_check()` (e.g. "the engine has started") to say yes; otherwise 503 in the
OpenAI error shape, so a load balancer stops sending traffic. /metrics first calls the optional
`app.state.refresh_metrics()` so engine gauges are current when scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from router.drain import Drain
from router.errors import APIError
from router.metrics import Metrics
from router.services import Services

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 5.0

router = APIRouter(tags=["health"])


def _not_ready(reason: str) -> APIError:
    return APIError(503, f"not ready: {reason}", "server_error", code="not_ready")


def _ping_catalog(services: Services) -> None:
    with services.zoo.sessions() as session:
        session.execute(text("SELECT 1"))


def _draining(request: Request) -> bool:
    drain: Drain | None = getattr(request.app.state, "drain", None)
    return drain is not None and drain.draining


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    # Still alive while draining (a liveness probe must not kill a draining server), but says so.
    return {"status": "draining" if _draining(request) else "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, str]:
    state = request.app.state
    services: Services | None = getattr(state, "services", None)
    if services is None:
        raise _not_ready("services not initialised")
    if _draining(request):
        raise _not_ready("draining for shutdown")
    try:
        # A hung database must not hang the probe: abandon the thread after the timeout.
        with anyio.fail_after(READY_TIMEOUT_S):
            await anyio.to_thread.run_sync(_ping_catalog, services, abandon_on_cancel=True)
    except TimeoutError:
        raise _not_ready("catalog did not answer in time") from None
    except Exception as exc:
        log.warning("readiness: catalog unreachable: %s", exc)
        raise _not_ready("catalog unreachable") from None
    check: Callable[[], bool] | None = getattr(state, "ready_check", None)
    if check is not None:
        try:
            ok = check()
        except Exception as exc:
            log.warning("readiness check failed: %s", exc)
            ok = False
        if not ok:
            raise _not_ready("engine not ready")
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state
    found: Metrics | None = getattr(state, "metrics", None)
    if found is None:
        raise APIError(404, "metrics are not enabled", code="not_found")
    refresh: Callable[[], None] | None = getattr(state, "refresh_metrics", None)
    if refresh is not None:
        try:
            refresh()
        except Exception:
            # Stale engine gauges beat no metrics at all.
            log.exception("refreshing metrics failed")
    return Response(found.render(), media_type=found.content_type)
