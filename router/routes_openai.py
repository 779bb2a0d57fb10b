"""OpenAI-compatible inference: /v1/models, /v1/completions, /v1/chat/completions (tenant key)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select

from router.admission import admit
from router.auth import ServicesDep, TenantDep
from router.errors import APIError
from router.generation import ChoiceResult, Generation
from router.inference import InferenceService, LoadedModel, get_inference
from router.openai_format import (
    chat_logprobs,
    chat_messages,
    completion_logprobs,
    sampling_params,
    usage,
)
from router.openai_schemas import ChatCompletionRequest, CompletionRequest
from router.prompts import get_prompts
from router.services import Services
from router.sse_chunks import ChunkFramer
from router.stream_errors import with_error_event
from router.streaming import GenerationStream, client_gone, collect
from zoo.catalog.models import BaseModel, Model
from zoo.catalog.types import ModelStatus
from zoo.errors import NotFoundError

router = APIRouter(tags=["inference"])
InferenceDep = Annotated[InferenceService, Depends(get_inference)]


def _list_models(services: Services, tenant_id: int) -> list[dict[str, Any]]:
    with services.zoo.sessions() as session:
        rows = session.execute(
            select(Model, BaseModel.name)
            .outerjoin(BaseModel, Model.base_model_id == BaseModel.id)
            .where(
                (Model.tenant_id == tenant_id) | Model.tenant_id.is_(None), Model.status == ModelStatus.READY
            )
            .order_by(Model.id)
        ).all()
        out = []
        for model, base_name in rows:
            shared = model.tenant_id is None
            out.append(
                {
                    "id": model.name,
                    "object": "model",
                    "created": int(model.created_at.timestamp()),
                    "owned_by": "blockzoo" if shared else "tenant",
                    "root": model.name if shared else base_name,
                    "parent": None if shared else base_name,
                    "kind": model.kind.value,
                }
            )
        return out


@router.get("/v1/models")
async def list_models(principal: TenantDep, services: ServicesDep) -> dict[str, Any]:
    data = await run_in_threadpool(_list_models, services, principal.tenant_id)
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_name}")
async def get_model(model_name: str, principal: TenantDep, services: ServicesDep) -> dict[str, Any]:
    data = await run_in_threadpool(_list_models, services, principal.tenant_id)
    for entry in data:
        if entry["id"] == model_name:
            return dict(entry)
    raise APIError(404, f"The model '{model_name}' does not exist", param="model", code="model_not_found")


async def _load(services: Services, inference: InferenceService, tenant: str, name: str) -> LoadedModel:
    # The common case (model looked up recently, chain loaded) touches neither the catalog nor a thread.
    cache = services.catalog_cache
    ref = cache.model(tenant, name)
    if ref is not None:
        loaded = inference.loaded(ref)
        if loaded is not None:
            return loaded
    generation = cache.generation

    def resolve_and_load() -> LoadedModel:
        if ref is None:
            # While the catalog is unreachable, the last answer for this model keeps it served.
            return inference.load(
                services.last_models.require((tenant, name), lambda: inference.resolve(tenant, name))
            )
        return inference.load(ref)

    try:
        loaded = await run_in_threadpool(resolve_and_load)
    except NotFoundError:
        raise APIError(
            404, f"The model '{name}' does not exist", param="model", code="model_not_found"
        ) from None
    cache.put_model(tenant, name, loaded.ref, generation)
    return loaded


def _check_sequences(services: Services, prompts: int, n: int) -> None:
    """prompts × n engine sequences at most; the 400 names whichever of the two alone is too many."""
    limit = services.settings.max_sequences_per_request
    if prompts * n > limit:
        param = "prompt" if prompts > limit else "n"
        raise APIError(
            400,
            f"This request asks for {prompts} prompt(s) × n={n} = {prompts * n} sequences; the limit is {limit}.",
            param=param,
            code="invalid_value",
        )


def _prompt_count(req: CompletionRequest) -> int:
    prompt = req.prompt
    return 1 if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else len(prompt)


async def _completion_prompts(
    request: Request, tenant: str, inference: InferenceService, loaded: LoadedModel, req: CompletionRequest
) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        texts: list[str] | None = [prompt]
    elif prompt and isinstance(prompt[0], str):
        texts = [p for p in prompt if isinstance(p, str)]
    else:
        texts = None
    limit = inference.max_model_len(loaded)
    if texts is not None:
        return await get_prompts(request).encode_prompts(tenant, loaded.tokenizer, texts, limit)
    # Token ids (ints, by the schema): an over-long list is refused by its length, before any Python
    # loop walks it on the event loop.
    ids = cast(list[list[int]], [prompt] if prompt and isinstance(prompt[0], int) else prompt)
    longest = max((len(p) for p in ids), default=0)
    if longest >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens, but the prompt has {longest} tokens.",
            param="prompt",
            code="context_length_exceeded",
        )
    return [list(p) for p in ids]


def _max_tokens(
    inference: InferenceService,
    loaded: LoadedModel,
    requested: int | None,
    prompt_len: int,
    param: str = "prompt",
) -> int:
    limit = inference.max_model_len(loaded)
    if prompt_len >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens, but the prompt has {prompt_len} tokens.",
            param=param,
            code="context_length_exceeded",
        )
    if requested is not None and prompt_len + requested > limit:
        # Refused here, with the figures, rather than by the engine's scheduler with a vaguer message.
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. The prompt has {prompt_len} tokens"
            f" and {requested} more were requested ({prompt_len + requested} in all).",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested if requested is not None else limit - prompt_len


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    request: Request,
    principal: TenantDep,
    services: ServicesDep,
    inference: InferenceDep,
) -> Any:
    _check_sequences(services, _prompt_count(body), body.n)
    loaded = await _load(services, inference, principal.tenant, body.model)
    prompts = await _completion_prompts(request, principal.tenant, inference, loaded, body)
    vocab = loaded.chain.config.vocab_size
    if any(t >= vocab for p in prompts for t in p):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
    engine_prompts: list[str | list[int]] = []
    params = []
    for prompt in prompts:
        max_tokens = _max_tokens(inference, loaded, body.max_tokens, len(prompt))
        for j in range(body.n):
            engine_prompts.append(prompt)
            params.append(sampling_params(body, max_tokens, body.logprobs, j))
    echo = [str(loaded.tokenizer.decode(p)) if body.echo else "" for p in prompts for _ in range(body.n)]
    # Each distinct prompt counts once, as in the response's usage, whatever n is.
    admission = await admit(request, principal, loaded, sum(len(p) for p in prompts), params)
    gen = Generation(inference, loaded, principal.tenant, request.state.request_id, n=body.n)
    try:
        await gen.add(engine_prompts, params)
    except BaseException:
        await admission.finish(gen, served=False)
        raise
    rid, created = _new_id("cmpl"), int(time.time())

    def choice_logprobs(r: ChoiceResult) -> dict[str, Any] | None:
        if body.logprobs is None:
            return None
        items = [lp for o in r.outputs for lp in o.new_logprobs]
        return completion_logprobs(loaded.tokenizer, items, len(echo[r.index]))

    if not body.stream:
        results = await collect(gen, request, admission)
        if results is None:
            return client_gone()
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": r.index,
                        "text": echo[r.index] + r.text,
                        "logprobs": choice_logprobs(r),
                        "finish_reason": r.finish_reason,
                    }
                    for r in results
                ],
                "usage": _usage(gen),
            },
            headers=admission.headers,
        )

    async def stream() -> AsyncGenerator[bytes, None]:
        # Aborting and accounting happen in GenerationStream, however this body ends.
        results = gen.results
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        framer = ChunkFramer(rid, created, body.model, "text_completion", include_usage)
        echoed = [
            framer.chunk({"index": i, "text": text, "logprobs": None, "finish_reason": None})
            for i, text in enumerate(echo)
            if text
        ]
        if echoed:
            yield "".join(echoed).encode()
        async for events in gen.events():
            parts = []
            for event in events:
                out, r = event.output, results[event.choice]
                offset = len(echo[r.index]) + len(r.text)
                r.update(out)
                lp = (
                    completion_logprobs(loaded.tokenizer, out.new_logprobs, offset)
                    if body.logprobs is not None
                    else None
                )
                parts.append(
                    framer.chunk(
                        {
                            "index": event.choice,
                            "text": out.new_text,
                            "logprobs": lp,
                            "finish_reason": out.finish_reason,
                        }
                    )
                )
            yield "".join(parts).encode()
        tail = framer.usage(_usage(gen)) if include_usage else ""
        # Accounted before the last chunk: a client that has read [DONE] finds its slot free again.
        await admission.finish(gen)
        yield (tail + framer.done()).encode()

    return GenerationStream(with_error_event(stream()), gen, admission)


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    principal: TenantDep,
    services: ServicesDep,
    inference: InferenceDep,
) -> Any:
    _check_sequences(services, 1, body.n)
    loaded = await _load(services, inference, principal.tenant, body.model)
    prompt = await get_prompts(request).chat_ids(
        principal.tenant, loaded.tokenizer, chat_messages(body), inference.max_model_len(loaded)
    )
    max_tokens = _max_tokens(
        inference, loaded, body.max_completion_tokens or body.max_tokens, len(prompt), "messages"
    )
    top = body.top_logprobs or 0 if body.logprobs else None
    params = [sampling_params(body, max_tokens, top, j) for j in range(body.n)]
    admission = await admit(request, principal, loaded, len(prompt), params)
    gen = Generation(inference, loaded, principal.tenant, request.state.request_id, n=body.n)
    try:
        await gen.add([prompt] * body.n, params)
    except BaseException:
        await admission.finish(gen, served=False)
        raise
    rid, created = _new_id("chatcmpl"), int(time.time())

    if not body.stream:
        results = await collect(gen, request, admission)
        if results is None:
            return client_gone()
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": r.index,
                        "message": {"role": "assistant", "content": r.text},
                        "logprobs": chat_logprobs(
                            loaded.tokenizer, [lp for o in r.outputs for lp in o.new_logprobs]
                        )
                        if body.logprobs
                        else None,
                        "finish_reason": r.finish_reason,
                    }
                    for r in results
                ],
                "usage": _usage(gen),
            },
            headers=admission.headers,
        )

    async def stream() -> AsyncGenerator[bytes, None]:
        # Aborting and accounting happen in GenerationStream, however this body ends.
        results = gen.results
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        framer = ChunkFramer(rid, created, body.model, "chat.completion.chunk", include_usage)
        first = {"role": "assistant", "content": ""}
        yield "".join(
            framer.chunk({"index": i, "delta": first, "logprobs": None, "finish_reason": None})
            for i in range(body.n)
        ).encode()
        async for events in gen.events():
            parts = []
            for event in events:
                out = event.output
                results[event.choice].update(out)
                lp = chat_logprobs(loaded.tokenizer, out.new_logprobs) if body.logprobs else None
                parts.append(
                    framer.chunk(
                        {
                            "index": event.choice,
                            "delta": {"content": out.new_text} if out.new_text else {},
                            "logprobs": lp,
                            "finish_reason": out.finish_reason,
                        }
                    )
                )
            yield "".join(parts).encode()
        tail = framer.usage(_usage(gen)) if include_usage else ""
        # Accounted before the last chunk: a client that has read [DONE] finds its slot free again.
        await admission.finish(gen)
        yield (tail + framer.done()).encode()

    return GenerationStream(with_error_event(stream()), gen, admission)


def _usage(gen: Generation) -> dict[str, Any]:
    # The same counts that usage rows, quotas and metrics are charged (Admission.finish).
    counts = gen.counts()
    return usage(counts.prompt_tokens, counts.completion_tokens, counts.cached_tokens)
