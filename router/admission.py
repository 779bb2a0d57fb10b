"""Before a request runs: quota checks. After it ends, however it ends: usage, metrics, quota release.

The quota lease is taken with the prompt plus the most tokens the request may generate, and
given back with what it really used, so a client that disconnects early pays only for that.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import Request

from router.generation import ChoiceResult, Generation
from router.inference import LoadedModel
from router.principal import Principal
from runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Admission:
    """One admitted request: its quota lease and the hooks that account for it when it ends."""

    def __init__(self, request: Request, principal: Principal, loaded: LoadedModel, lease: Any) -> None:
        self.request = request
        self.principal = principal
        self.loaded = loaded
        self.lease = lease
        self.headers: dict[str, str] = dict(getattr(lease, "headers", {}) or {})
        self._done = False

    async def finish(self, gen: Generation, results: list[ChoiceResult]) -> None:
        if self._done:
            return
        self._done = True
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(len(r.token_ids) for r in results)
        state = self.request.app.state
        try:
            if self.lease is not None:
                await self.lease.release(prompt + completion)
            usage = getattr(state, "usage", None)
            if usage is not None and results:
                usage.add(self.principal.tenant_id, self.loaded.ref.id, prompt, completion, datetime.now(UTC))
            metrics = getattr(state, "metrics", None)
            if metrics is not None and results:
                timing = gen.timing
                ttft = (timing.first_token - timing.start) if timing.first_token is not None else None
                reasons = {r.finish_reason or "abort" for r in results}
                metrics.observe_request(
                    tenant=self.principal.tenant,
                    model=self.loaded.ref.name,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    ttft_s=ttft,
                    itl_s=timing.inter_token,
                    e2e_s=time.monotonic() - timing.start,
                    finish_reason=sorted(reasons)[0],
                )
        except Exception:  # accounting must never turn a served request into an error
            log.exception("request accounting failed")


async def admit(
    request: Request,
    principal: Principal,
    loaded: LoadedModel,
    prompt_tokens: int,
    params: list[SamplingParams],
) -> Admission:
    """Check the tenant's quotas for this request (429 if over) and return its admission."""
    quotas = getattr(request.app.state, "quotas", None)
    lease = None
    if quotas is not None:
        estimated = prompt_tokens + sum(p.max_tokens for p in params)
        lease = await quotas.acquire(principal, estimated)
    return Admission(request, principal, loaded, lease)
