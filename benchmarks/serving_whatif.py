"""What-if variants of the server, for measuring suggested fixes without changing router/ code.

`cache_catalog` removes the catalog from the per-request path the way a fix in router/ would:
API keys and model resolutions are cached in memory (FastAPI's `dependency_overrides` and an
instance attribute over `InferenceService.resolve`), and usage is summed in memory and written once
at the end instead of one upsert and commit per request. Only for measurements: these caches never
expire, so a revoked key or a deleted model would still be served.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request

from benchmarks.serving_server import DemoServer
from router.auth import Principal, require_tenant
from router.services import Services, get_services
from router.usage import UsageRecorder
from zoo.registry import ModelRef


class SummingUsage:
    """Usage summed per (tenant, model) in memory; `flush` writes it through the real recorder."""

    def __init__(self, recorder: UsageRecorder) -> None:
        self.recorder = recorder
        self.totals: Counter[tuple[int, int, str]] = Counter()

    def record(
        self, tenant_id: int, model_id: int, prompt_tokens: int, completion_tokens: int, at: datetime
    ) -> bool:
        self.totals[(tenant_id, model_id, "prompt")] += prompt_tokens
        self.totals[(tenant_id, model_id, "completion")] += completion_tokens
        return True

    def flush(self) -> None:
        keys = {(t, m) for t, m, _ in self.totals}
        for t, m in keys:
            prompt, completion = self.totals[(t, m, "prompt")], self.totals[(t, m, "completion")]
            self.recorder.record(t, m, prompt, completion, datetime.now(UTC))
        self.totals.clear()


def cache_catalog(server: DemoServer) -> Callable[[], None]:
    """Apply the caches to `server`; returns the function that writes the summed usage out."""
    principals: dict[str, Principal] = {}

    async def cached_tenant(
        request: Request, services: Annotated[Services, Depends(get_services)]
    ) -> Principal:
        key = request.headers.get("authorization", "")
        principal = principals.get(key)
        if principal is None:
            principal = principals[key] = await require_tenant(request, services)
        return principal

    server.app.dependency_overrides[require_tenant] = cached_tenant
    resolve = server.inference.resolve
    refs: dict[tuple[str, str], ModelRef] = {}

    def cached_resolve(tenant: str, name: str) -> ModelRef:
        ref = refs.get((tenant, name))
        if ref is None:
            ref = refs[(tenant, name)] = resolve(tenant, name)
        return ref

    setattr(server.inference, "resolve", cached_resolve)  # noqa: B010
    usage = SummingUsage(server.app.state.usage)
    server.app.state.usage = usage
    return usage.flush
