"""Running one OpenAI request on the engine: n choices, streaming merge, usage, abort on disconnect.

Aborting is synchronous (`Generation.abort` queues each choice's abort for the engine thread without
awaiting), so cleanup that runs in a cancelled scope, after a client disconnected, still aborts.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import NamedTuple

from fastapi import Request

from router.inference import InferenceService, LoadedModel
from runtime.async_engine import RequestStream
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams

# How long accounting waits for the engine thread to apply an abort (normally under one step).
ABORT_SETTLE_TIMEOUT_S = 5.0


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


class UsageCounts(NamedTuple):
    """A request's tokens as its response reports them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


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
        self, inference: InferenceService, loaded: LoadedModel, tenant: str, request_id: str, n: int = 1
    ) -> None:
        self.inference = inference
        self.loaded = loaded
        self.tenant = tenant
        # The server's id for this HTTP request (never the client's label): engine ids derive from it.
        self.request_id = request_id
        # Choices per prompt: the prompts come in groups of n equal ones.
        self.n = n
        self.streams: list[RequestStream] = []
        # What each choice has produced so far; whoever reads `events()` folds its outputs in.
        self.results: list[ChoiceResult] = []
        self.client_gone = False
        # Events the merge had taken from the streams but nobody read when it stopped.
        self._unread: list[ChoiceEvent] = []
        self.timing = Timing()

    async def add(self, prompts: list[str | list[int]], params: list[SamplingParams]) -> None:
        engine = self.inference.engine_for(self.loaded)
        self.results = [
            ChoiceResult(i, prompt_tokens=len(p) if isinstance(p, list) else 0) for i, p in enumerate(prompts)
        ]
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
            self.abort()
            raise

    def abort(self) -> None:
        """Abort every choice that has not finished. Nothing here awaits, so a cancellation cannot
        stop it after the first choice."""
        for stream in self.streams:
            stream.abort_nowait()

    async def settle(self) -> None:
        """Fold in the outputs that the engine generated but nobody read, so an aborted request is
        charged for every token the engine really generated for it."""
        for stream in self.streams:
            await stream.abort_applied(ABORT_SETTLE_TIMEOUT_S)
        for event in self._unread:
            self.results[event.choice].update(event.output)
        self._unread = []
        for stream, result in zip(self.streams, self.results, strict=False):
            for out in stream.take_pending():
                result.update(out)

    def counts(self) -> UsageCounts:
        """Each distinct prompt once (OpenAI's rule for n > 1) and every choice's completion."""
        firsts = self.results[:: max(1, self.n)]
        return UsageCounts(
            sum(r.prompt_tokens for r in firsts),
            sum(len(r.token_ids) for r in self.results),
            sum(r.cached_tokens for r in firsts),
        )

    async def events(self) -> AsyncGenerator[list[ChoiceEvent], None]:
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
            self.abort()

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
            while not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, list):
                    self._unread.extend(item)

    async def collect(self, http_request: Request | None) -> bool:
        """Run every choice to its end, folding the outputs into `results`. Returns False when the
        client went away first: then every choice was aborted and `results` holds what ran."""
        listener = (
            None if http_request is None else asyncio.create_task(self._abort_on_disconnect(http_request))
        )
        try:
            async with aclosing(self.events()) as events:
                async for batch in events:
                    for event in batch:
                        self.results[event.choice].update(event.output)
        finally:
            if listener is not None:
                listener.cancel()
        return not self.client_gone

    async def _abort_on_disconnect(self, http_request: Request) -> None:
        # The body was read already, so the server's next message is the disconnect. Waiting for
        # it (as Starlette's StreamingResponse does) reacts at once, where polling would lag.
        while (await http_request.receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        self.abort()
