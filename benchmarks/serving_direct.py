"""The "engine directly" baseline: the server's own engines, called in-process without HTTP.

Each request goes to the engine the server would use (`InferenceService.engine_for`), with the same
chain, tokenizer, prompt ids and sampling parameters the /v1/completions route would build
(`router.openai_format.sampling_params` on the same request body), at the same arrival time. What the
HTTP path adds on top (auth, model lookup, quotas, usage and metrics, JSON and SSE, the client) is
exactly the difference between the two runs.
"""

from __future__ import annotations

import asyncio
import time

from benchmarks.loadgen import request_body
from benchmarks.serving_metrics import RequestRecord, RunResult
from benchmarks.serving_workload import Schedule, ServingRequest
from router.inference import InferenceService, LoadedModel
from router.openai_format import sampling_params
from router.openai_schemas import CompletionRequest


def load_targets(inference: InferenceService, schedule: Schedule) -> list[LoadedModel]:
    """Each target's loaded model, as the server resolves it for the target's tenant."""
    loaded = []
    for target in schedule.targets:
        if not target.tenant:
            raise ValueError(f"target {target.model!r} has no tenant: the direct baseline needs one")
        loaded.append(inference.load(inference.resolve(target.tenant, target.model)))
    return loaded


async def _one(
    inference: InferenceService,
    loaded: LoadedModel,
    tenant: str,
    req: ServingRequest,
    request_id: str,
    t0: float,
    temperature: float,
) -> RequestRecord:
    rec = RequestRecord(req.index, req.target, req.prompt_len)
    rec.sent_s = time.perf_counter() - t0
    body = CompletionRequest.model_validate(request_body(req, loaded.ref.name, temperature))
    params = sampling_params(body, req.output_len, None, 0)
    prompt = req.prompt_ids or list(loaded.tokenizer.encode(req.prompt_text))
    engine = inference.engine_for(loaded)
    try:
        async for out in engine.generate(
            prompt,
            params,
            request_id,
            chain=loaded.chain,
            tokenizer=loaded.tokenizer,
            tenant=tenant,
            model=loaded.ref.name,
        ):
            if out.new_token_ids:
                rec.token_times.append(time.perf_counter() - t0)
                rec.output_tokens += len(out.new_token_ids)
    except Exception as exc:  # recorded like an HTTP error, so one bad request does not end the run
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end_s = time.perf_counter() - t0
    return rec


async def run_direct(
    inference: InferenceService, schedule: Schedule, run_tag: str, temperature: float = 0.0
) -> RunResult:
    """Run `schedule` on the engines in this event loop, timed like `loadgen.run_http`; the client's
    CPU is not measured apart here (it is this thread's, shared with the event loop)."""
    loaded = load_targets(inference, schedule)
    t0 = time.perf_counter()
    tasks = []
    for req in schedule.requests:
        delay = t0 + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        target = schedule.targets[req.target]
        rid = f"direct-{run_tag}-{req.index}"
        tasks.append(
            asyncio.create_task(_one(inference, loaded[req.target], target.tenant, req, rid, t0, temperature))
        )
    records = list(await asyncio.gather(*tasks))
    return RunResult(records, max(r.end_s for r in records))
