"""Running one OpenAI request on the engine: n choices, streaming merge, usage, abort on disconnect."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import aclosing
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
                        cache_salt=self.inference.cache_salt(self.loaded, self.tenant),
                    )
                )
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        for stream in self.streams:
            await stream.abort()

    async def events(self) -> AsyncIterator[list[ChoiceEvent]]:
        """All choices' outputs in arrival order, in batches of whatever had arrived by then."""
        try:
            if len(self.streams) == 1:
                # The common case needs no merging: no pump task, no second queue.
                async with aclosing(self.streams[0].batches()) as batches:
                    async for outputs in batches:
                        yield self._events(0, outputs)
            else:
                async with aclosing(self._merged()) as merged:
                    async for events in merged:
                        yield events
        finally:
            await self.abort()

    def _events(self, choice: int, outputs: list[RequestOutput]) -> list[ChoiceEvent]:
        for out in outputs:
            if out.new_token_ids:
                self.timing.mark()
        return [ChoiceEvent(choice, out) for out in outputs]

    async def _merged(self) -> AsyncGenerator[list[ChoiceEvent], None]:
        queue: asyncio.Queue[list[ChoiceEvent] | BaseException | None] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for outputs in stream.batches():
                    queue.put_nowait(self._events(index, outputs))
            except BaseException as exc:
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(tasks)
        try:
            while remaining:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                events: list[ChoiceEvent] = []
                for item in items:
                    if item is None:
                        remaining -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        events.extend(item)
                if events:
                    yield events
        finally:
            for task in tasks:
                task.cancel()

    async def collect(self, http_request: Request | None) -> list[ChoiceResult]:
        """Run to completion; a client that disconnects meanwhile aborts every choice."""
        results = [ChoiceResult(i) for i in range(len(self.streams))]

        async def consume() -> None:
            async for events in self.events():
                for event in events:
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
