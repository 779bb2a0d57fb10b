"""The narrow objects the scheduler hands to the executor, and the executor hands back."""

from __future__ import annotations

from typing import NamedTuple

import torch

from runtime.request import Request


class ScheduledChunk(NamedTuple):
    """`num_tokens` new tokens of `request`, starting at its `num_computed_tokens`.

    `sample` is true when the chunk reaches the request's last known token, so its last row's
    logits pick the next token. A prompt chunk that stops short of the end samples nothing.
    """

    request: Request
    num_tokens: int
    sample: bool


class SchedulerOutput(NamedTuple):
    """One step's plan: decodes first, then prompt chunks, within the token budget."""

    chunks: list[ScheduledChunk]
    preempted: list[Request]
    num_batched_tokens: int

    @property
    def empty(self) -> bool:
        return not self.chunks


class ExecutorOutput(NamedTuple):
    """Logits of the sampling rows, in the order of the chunks whose `sample` is true."""

    logits: torch.Tensor
    requests: list[Request]
