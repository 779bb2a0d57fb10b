"""Deciding when a request is done after each new token, and which text is safe to stream.

Per token, the caller does::

    request.append_output_token(token_id)
    delta = detok.add_token(token_id)
    decision = check_stop(request, detok, delta)
    stream(decision.emit_text)            # then finish the request if decision.finished

Streaming must never show text that a stop string later removes, so ``emit_text`` holds back
the longest tail of the output that is a proper prefix of some stop string, and releases it
once it can no longer become one (or the request finishes). How much was held back after the
previous token is a pure function of the text before this delta, so nothing per request has to
be stored: the text of record is ``detok.text``, and a :class:`StopStringMatcher` built from the
params does the string work. The only rule is to call :func:`check_stop` once per token, in order.

Rules follow vLLM: nothing stops before ``min_tokens`` outputs; then EOS (unless
``ignore_eos``; stop_reason None), a stop token (stop_reason = the id) or a stop string
(stop_reason = the string) finish the request as FINISHED_STOPPED, and reaching ``max_tokens``
finishes it as FINISHED_LENGTH. The text of an EOS or stop token (the whole delta of that step)
and a stop string with anything after it are left out unless ``include_stop_str_in_output``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from runtime.detokenizer import IncrementalDetokenizer
from runtime.request import Request, RequestStatus


class StopDecision(NamedTuple):
    """The verdict after one token: whether and why the request ended, and what to stream now."""

    finished: bool
    status: RequestStatus
    stop_reason: int | str | None
    emit_text: str


class StopMatch(NamedTuple):
    """A stop string found in the output text at ``start``."""

    start: int
    stop: str


class StopStringMatcher:
    """Finds stop strings in a growing text and measures the tail that could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)

    def find(self, text: str, new_start: int) -> StopMatch | None:
        """The earliest stop string in ``text`` that ends after ``new_start``.

        Matches ending at or before ``new_start`` were already looked for, so each stop string is
        searched only from where it could first overlap the new text. Among matches at the same
        position, the one listed first wins.
        """
        best: StopMatch | None = None
        for stop in self.stops:
            start = text.find(stop, max(0, new_start - len(stop) + 1))
            if start != -1 and (best is None or start < best.start):
                best = StopMatch(start, stop)
        return best

    def held_back(self, text: str, end: int) -> int:
        """Length of the longest suffix of ``text[:end]`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, end), longest, -1):
                if text.endswith(stop[:size], 0, end):
                    longest = size
                    break
        return longest


def check_stop(request: Request, detok: IncrementalDetokenizer, new_text: str) -> StopDecision:
    """Decide whether ``request`` is finished now that its last output token was detokenized.

    ``new_text`` is the delta ``detok.add_token`` returned for that token (already part of
    ``detok.text``). On FINISHED_LENGTH the detokenizer is flushed so a trailing incomplete
    character is not silently lost.
    """
    params = request.params
    if not request.output_token_ids:
        raise ValueError("check_stop needs the new token appended to request.output_token_ids first")
    text = detok.text
    new_start = len(text) - len(new_text)
    if new_start < 0 or not text.endswith(new_text):
        raise ValueError("new_text must be the latest delta of detok.text")
    matcher = StopStringMatcher(params.stop) if params.stop else None
    # Everything before the tail held back after the previous token was already streamed.
    emitted = new_start - (matcher.held_back(text, new_start) if matcher else 0)
    keep_stop = params.include_stop_str_in_output
    token_id = request.output_token_ids[-1]
    can_stop = request.num_output_tokens >= params.min_tokens

    if can_stop and token_id in request.eos_token_ids and not params.ignore_eos:
        return _stopped(None, text[emitted : len(text) if keep_stop else new_start])
    if can_stop and token_id in params.stop_token_ids:
        return _stopped(token_id, text[emitted : len(text) if keep_stop else new_start])
    length_reached = request.num_output_tokens >= params.max_tokens
    if length_reached:
        detok.finalize()
        text = detok.text
    if can_stop and matcher is not None:
        match = matcher.find(text, new_start)
        if match is not None:
            end = match.start + len(match.stop) if keep_stop else match.start
            return _stopped(match.stop, text[emitted:end])
    if length_reached:
        return StopDecision(True, RequestStatus.FINISHED_LENGTH, None, text[emitted:])
    safe_end = len(text) - (matcher.held_back(text, len(text)) if matcher else 0)
    return StopDecision(False, request.status, None, text[emitted:safe_end])


def _stopped(reason: int | str | None, emit_text: str) -> StopDecision:
    return StopDecision(True, RequestStatus.FINISHED_STOPPED, reason, emit_text)
