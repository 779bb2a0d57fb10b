"""The FastAPI application: one factory that wires the services, routes and error handling."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI

from router.body_limit import BodyLimitMiddleware
from router.errors import install_error_handlers
from router.inference import InferenceService
from router.prompts import PromptBuilder
from router.request_id import RequestIdMiddleware
from router.routes_openai import router as openai_router
from router.services import Services


def create_app(
    services: Services,
    inference: InferenceService,
    *,
    routers: Sequence[APIRouter] = (),
    state: dict[str, Any] | None = None,
    on_shutdown: Sequence[Callable[[], None]] = (),
    async_on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
) -> FastAPI:
    """The app over the given services; `state` adds subsystems (quotas, metrics, usage, jobs) by name."""

    prompts = PromptBuilder(services.settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            inference.shutdown()
            prompts.shutdown()
            for hook in on_shutdown:
                hook()
            for async_hook in async_on_shutdown:
                await async_hook()

    app = FastAPI(
        title="BlockZoo",
        version="0.1.0",
        description="Many fine-tunes, one zoo of blocks: OpenAI-compatible inference per tenant.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    settings = services.settings
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_body_bytes,
        multipart_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(RequestIdMiddleware)
    app.state.services = services
    app.state.inference = inference
    app.state.prompts = prompts
    for name, value in (state or {}).items():
        setattr(app.state, name, value)
    app.include_router(openai_router)
    for extra in routers:
        app.include_router(extra)
    return app
