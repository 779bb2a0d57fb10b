"""Before a request runs: quota checks. After it ends, however it ends: usage, metrics, quota release.

The quota lease is taken with the prompt plus the most tokens the request may generate, and
given back with what it really used, so a client that disconnects early pays only for that.
Usage rows, the lease and the metrics all count a request's tokens as its response reports them
(`Generation.counts`: each distinct prompt once, whatever n is), exactly once per request.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import Request

from router.generation import Generation
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

    async def finish(self, gen: Generation, served: bool = True) -> None:
        """Account for the request, once: give the lease back with the tokens used and, if it was
        `served` (it got as far as the engine), record usage, metrics and a log line.

        Shielded, so it runs to the end even when called from a cancelled scope: the cleanup of a
        response whose client disconnected runs inside Starlette's cancelled task group.
        """
        if self._done:
            return
        self._done = True
        with anyio.CancelScope(shield=True):
            await self._account(gen, served)

    async def _account(self, gen: Generation, served: bool) -> None:
        await gen.settle()
        counts = gen.counts()
        prompt, completion = (counts.prompt_tokens, counts.completion_tokens) if served else (0, 0)
        state = self.request.app.state
        try:
            if self.lease is not None:
                await self.lease.release(prompt + completion)
            if not served:
                return
            usage = getattr(state, "usage", None)
            if usage is not None:
                usage.add(self.principal.tenant_id, self.loaded.ref.id, prompt, completion, datetime.now(UTC))
            reasons = sorted({r.finish_reason or "abort" for r in gen.results}) or ["abort"]
            metrics = getattr(state, "metrics", None)
            if metrics is not None:
                timing = gen.timing
                ttft = (timing.first_token - timing.start) if timing.first_token is not None else None
                metrics.observe_request(
                    tenant=self.principal.tenant,
                    model=self.loaded.ref.name,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    ttft_s=ttft,
                    itl_s=timing.inter_token,
                    e2e_s=time.monotonic() - timing.start,
                    finish_reason=reasons[0],
                )
            log.info(
                "request finished",
                extra={
                    "tenant": self.principal.tenant,
                    "model": self.loaded.ref.name,
                    "choices": len(gen.results),
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "finish_reason": reasons[0],
                    "client_gone": gen.client_gone,
                },
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
