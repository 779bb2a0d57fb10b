"""Running one OpenAI request on the engine: n choices, streaming merge, usage, abort on disconnect."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fastapi import Request

from router.inference import InferenceService, LoadedModel
from runtime.async_engine import RequestStream
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams


class ChoiceEvent(NamedTuple):
    """One step of one choice: which choice, and the engine's output for it."""

    choice: int
    output: RequestOutput


@dataclass
class ChoiceResult:
    """Everything a non-streaming response needs about one choice."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    outputs: list[RequestOutput] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def update(self, out: RequestOutput) -> None:
        """Fold one step's output into the choice."""
        self.outputs.append(out)
        self.text = out.text
        self.token_ids = out.token_ids
        self.prompt_tokens = len(out.prompt_token_ids)
        self.cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason


@dataclass
class Timing:
    """Latency figures of one request for the metrics."""

    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)

    def mark(self) -> None:
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        self.token_times.append(now)

    @property
    def inter_token(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


class Generation:
    """The engine requests behind one API request (one per prompt × n), added up front so that
    bad input fails before any response starts."""

    def __init__(
        self, inference: InferenceService, loaded: LoadedModel, tenant: str, request_id: str
    ) -> None:
        self.inference = inference
        self.loaded = loaded
        self.tenant = tenant
        self.request_id = request_id
        self.streams: list[RequestStream] = []
        self.timing = Timing()

    async def add(self, prompts: list[str | list[int]], params: list[SamplingParams]) -> None:
        engine = self.inference.engine_for(self.loaded)
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
                self.streams.append(
                    await engine.add_request(
                        prompt,
                        sp,
                        f"{self.request_id}-{i}",
                        chain=self.loaded.chain,
                        tokenizer=self.loaded.tokenizer,
                        tenant=self.tenant,
                        model=self.loaded.ref.name,
                    )
                )
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        for stream in self.streams:
            await stream.abort()

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """All choices' outputs, merged in arrival order."""
        queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    await queue.put(ChoiceEvent(index, out))
            except BaseException as exc:
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                if item.output.new_token_ids:
                    self.timing.mark()
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await self.abort()

    async def collect(self, http_request: Request | None) -> list[ChoiceResult]:
        """Run to completion; a client that disconnects meanwhile aborts every choice."""
        results = [ChoiceResult(i) for i in range(len(self.streams))]

        async def consume() -> None:
            async for event in self.events():
                results[event.choice].update(event.output)

        await watch_disconnect(consume, http_request, self.abort)
        return results


async def watch_disconnect(
    work: Callable[[], Coroutine[Any, Any, None]],
    http_request: Request | None,
    on_disconnect: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Run `work()` but stop it and call `on_disconnect` if the client goes away."""
    task = asyncio.ensure_future(work())
    if http_request is None:
        await task
        return
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            break
        if await http_request.is_disconnected():
            task.cancel()
            await on_disconnect()
            raise asyncio.CancelledError("client disconnected")
    await task
