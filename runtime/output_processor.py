"""Turns sampled tokens into per-request outputs: detokenize, check stops, build RequestOutput."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from runtime.detokenizer import IncrementalDetokenizer
from runtime.outputs import RequestOutput
from runtime.request import Request
from runtime.sampler import TokenLogprobs
from runtime.stop_checker import check_stop


class _RequestState:
    """Output-side state of one request: its detokenizer and the text streamed so far."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, request: Request) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        self.text = ""
        self.first_token_time: float | None = None


class OutputProcessor:
    """Keeps the detokenizer of every live request; the engine calls it once per sampled token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add(self, request: Request, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self._states[request.request_id] = _RequestState(tokenizer or self.tokenizer, request)

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(
        self, request: Request, token_id: int, logprobs: TokenLogprobs | None, now: float
    ) -> RequestOutput:
        """`request` already has `token_id` appended; decide if it finished and what to stream."""
        state = self._states[request.request_id]
        if state.first_token_time is None:
            state.first_token_time = now
        delta = state.detok.add_token(token_id)
        decision = check_stop(request, state.detok, delta)
        state.text += decision.emit_text
        if decision.finished:
            del self._states[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            new_token_ids=[token_id],
            new_text=decision.emit_text,
            token_ids=list(request.output_token_ids),
            text=state.text,
            new_logprobs=[logprobs] if logprobs is not None else [],
            finished=decision.finished,
            finish_reason=decision.status.value if decision.finished else None,
            stop_reason=decision.stop_reason,
            num_cached_tokens=request.num_cached_tokens,
        )
