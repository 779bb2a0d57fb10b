"""An asyncio front for LLMEngine: a background thread steps the engine and streams outputs.

The engine is not thread-safe, so every mutation (add, abort) is sent to the engine thread as a
command and applied between steps; callers await its result through a future. torch releases the
GIL inside its kernels, so the event loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import aclosing
from typing import Any

from transformers import PreTrainedTokenizerBase

from runtime.chain import Chain
from runtime.engine import LLMEngine, StepFailedError
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class _Aborted:
    """Ends a stream's queue when its request is aborted from this side, so its reader stops."""


_ABORTED = _Aborted()
_Item = RequestOutput | BaseException | _Aborted


class _Stream:
    """Where one request's outputs go: an asyncio queue fed from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()

    def put(self, item: _Item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[_Stream, _Item]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


class RequestStream:
    """One request's outputs as an async iterator; leaving it early (or closing it) aborts the request.

    Aborting never awaits anything before the abort is queued for the engine thread, so a caller
    inside a cancelled scope (a client that disconnected) still aborts the request.
    """

    def __init__(self, engine: AsyncLLMEngine, request_id: str, stream: _Stream) -> None:
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self.finished = False
        self._aborting: Future[bool] | None = None

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        async with aclosing(self.batches()) as batches:
            async for batch in batches:
                for item in batch:
                    yield item

    async def batches(self) -> AsyncGenerator[list[RequestOutput], None]:
        """The outputs in batches: everything queued by the time the consumer gets to run.

        A consumer that falls behind the engine then handles several steps' outputs at once (one
        socket write instead of several) rather than falling further behind. An abort ends it.
        """
        queue = self._stream.queue
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                outputs: list[RequestOutput] = []
                ended = False
                for item in batch:
                    if isinstance(item, _Aborted):
                        ended = True
                        break
                    if isinstance(item, BaseException):
                        raise item
                    outputs.append(item)
                    if item.finished:
                        self.finished = ended = True
                        break
                if outputs:
                    yield outputs
                if ended:
                    return
        finally:
            self.abort_nowait()

    def take_pending(self) -> list[RequestOutput]:
        """The outputs that arrived but were not read yet (to account for them after an abort)."""
        queue = self._stream.queue
        found: list[RequestOutput] = []
        while not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, RequestOutput):
                found.append(item)
        return found

    def abort_nowait(self) -> None:
        """Abort the request unless it finished: queued for the engine thread at once, applied
        before its next step, and the reader of this stream stops."""
        if not self.finished:
            self.finished = True
            self._aborting = self.engine.abort_nowait(self.request_id, self._stream)
            self._stream.queue.put_nowait(_ABORTED)

    async def abort_applied(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until the engine thread has applied this stream's abort. The
        outputs of every step before it were handed to the event loop first, so by then they sit in
        this stream's queue (`take_pending`). Cancelling the wait leaves the abort in place."""
        if self._aborting is None or not self.engine.running:
            return
        done = asyncio.shield(asyncio.wrap_future(self._aborting))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, timeout_s)

    async def abort(self) -> None:
        """Abort, then wait until the engine thread has dropped the request."""
        self.abort_nowait()
        if self._aborting is not None:
            await asyncio.shield(asyncio.wrap_future(self._aborting))


class AsyncLLMEngine:
    """Streams each request's outputs; aborting a stream (or closing its iterator) aborts the request."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="blockzoo-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Queue `fn` to run on the engine thread between steps; thread-safe, never blocks.

        The command is skipped if its future is cancelled before the engine thread reaches it.
        """
        self.start()
        fut: Future[Any] = Future()
        self._commands.put((fn, fut))
        self._wakeup.set()
        return fut

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps and return its result (or raise its error).

        Cancelling the caller cancels the command if it has not started: wrap_future passes the
        cancellation on to the command's future. Commands that must happen (aborts) use `submit`.
        """
        return await asyncio.wrap_future(self.submit(fn))

    async def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        chain: Chain | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        tenant: str = "",
        model: str = "",
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Queue a request and return its stream; bad requests raise here, before any output."""
        stream = _Stream(asyncio.get_running_loop())

        def add() -> str:
            # Never replace another request's stream: that request would hang, its client with it.
            if request_id in self._streams or self.engine.scheduler.get_request(request_id) is not None:
                raise ValueError(f"request id {request_id!r} is already in use")
            # Register the stream before the request can produce output.
            self._streams[request_id] = stream
            try:
                return self.engine.add_request(
                    prompt,
                    params,
                    request_id=request_id,
                    chain=chain,
                    tokenizer=tokenizer,
                    tenant=tenant,
                    model=model,
                    cache_salt=cache_salt,
                )
            except BaseException:
                self._streams.pop(request_id, None)
                raise

        try:
            await self.call(add)
        except asyncio.CancelledError:
            # The caller will never read this stream: if `add` ran after all, take the request back.
            self.abort_nowait(request_id, stream)
            raise
        return RequestStream(self, request_id, stream)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        chain: Chain | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        tenant: str = "",
        model: str = "",
    ) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(prompt, params, request_id, chain, tokenizer, tenant, model)
        try:
            async for item in stream:
                yield item
        finally:
            # Closing this generator does not close the inner one; abort explicitly.
            await stream.abort()

    def abort_nowait(self, request_id: str, stream: _Stream | None = None) -> Future[bool]:
        """Queue an abort for the engine thread (applied before its next step) without awaiting.

        Nothing the caller awaits can cancel it, so it also works from code running in a cancelled
        scope, such as the cleanup of a response whose client disconnected. With `stream`, only
        the request registered with that very stream is aborted, never a later one of the same id.
        """

        def do_abort() -> bool:
            current = self._streams.get(request_id)
            if stream is not None and current is not stream:
                return False
            self._streams.pop(request_id, None)
            return self.engine.abort(request_id)

        return self.submit(do_abort)

    async def abort(self, request_id: str, stream: _Stream | None = None) -> bool:
        """Abort and wait for the engine thread to apply it; cancelling the wait does not undo it."""
        done = asyncio.wrap_future(self.abort_nowait(request_id, stream))
        result: bool = await asyncio.shield(done)
        return result

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wakeup.clear()
            self._drain_commands()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(timeout=1.0)
                continue
            try:
                outputs = self.engine.step()
            except StepFailedError as exc:
                # A bug hit this step's requests: they were aborted and get the error; the requests
                # not in the step (waiting, or left out by the budget) go on.
                log.error(
                    "engine step failed; its requests were aborted",
                    exc_info=exc.__cause__ or exc,
                    extra={"request_ids": exc.request_ids},
                )
                self._fail_all(exc, exc.request_ids)
                continue
            except Exception as exc:  # the engine's own bookkeeping broke: no request can trust it
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            self._publish(outputs)
        self._fail_all(RuntimeError("engine shut down"))

    def _publish(self, outputs: list[RequestOutput]) -> None:
        # One wake-up of each event loop per step, not one per request: every
        # call_soon_threadsafe writes to the loop's self-pipe and takes the GIL on the other side.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, _Item]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            by_loop.setdefault(stream.loop, []).append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: its clients are gone
                log.warning("dropping outputs for a closed event loop")

    def _fail_all(self, exc: BaseException, request_ids: list[str] | None = None) -> None:
        """Abort these requests (default: every one) and hand `exc` to their streams."""
        for rid in list(self._streams) if request_ids is None else request_ids:
            stream = self._streams.pop(rid, None)
            self.engine.abort(rid)
            if stream is None:
                continue
            try:
                stream.put(exc)
            except RuntimeError:  # that loop is closed: its client is gone
                log.warning("dropping an error for a closed event loop", extra={"request_id": rid})
