"""Perplexity, mean KL and top-1 agreement of several models on the same token windows.

Every model sees every window; the reference's distributions are computed once per window and
compared with each candidate's right away, so no window's full-vocabulary log-probabilities are
kept. In a window of T tokens the T − 1 positions that have a next token are scored: perplexity is
exp of the mean negative log-likelihood of those next tokens, KL is KL(reference ‖ model) of the
next-token distributions at those positions (natural log), and top-1 agreement is the share of
positions where the two argmaxes agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

Logits = Callable[[list[int]], torch.Tensor]


class QualityFigures(NamedTuple):
    """One model's figures over every scored position, and the seconds its forward passes took."""

    perplexity: float
    mean_kl: float
    top1_agreement: float
    positions: int
    seconds: float


class QualityTally:
    """Running sums for one model: negative log-likelihood, KL to the reference, top-1 agreements."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.positions = 0
        self.seconds = 0.0

    def add(self, log_probs: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one window: `log_probs` and `reference` [P, V] log-softmaxed, `targets` [P] next tokens."""
        if log_probs.shape != reference.shape or log_probs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"shapes disagree: {list(log_probs.shape)}, {list(reference.shape)}, {list(targets.shape)}"
            )
        p = reference.exp()
        # 0 · log 0 = 0: positions the reference rules out add nothing, even where the model does too.
        kl = torch.where(p > 0, p * (reference - log_probs), torch.zeros_like(p)).sum(-1)
        self.kl += float(kl.sum())
        self.nll -= float(log_probs.gather(1, targets[:, None]).sum())
        self.agree += int((log_probs.argmax(-1) == reference.argmax(-1)).sum())
        self.positions += int(targets.shape[0])

    def figures(self) -> QualityFigures:
        if self.positions == 0:
            raise ValueError("no positions were scored")
        n = self.positions
        return QualityFigures(math.exp(self.nll / n), max(self.kl / n, 0.0), self.agree / n, n, self.seconds)


def evaluate(
    models: Mapping[str, Logits],
    reference: str,
    windows: Sequence[list[int]],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, QualityFigures]:
    """Figures for every model in `models` against `models[reference]`, over `windows` of token ids.

    Each model maps a window's token ids to logits [T, V] for every position.
    """
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not among the models {sorted(models)}")
    if not windows or any(len(w) < 2 for w in windows):
        raise ValueError("every window needs at least two tokens")
    tallies = {name: QualityTally() for name in models}
    order = [reference, *(n for n in models if n != reference)]
    for done, window in enumerate(windows, start=1):
        targets = torch.tensor(window[1:])
        ref_log_probs: torch.Tensor | None = None
        for name in order:
            start = time.perf_counter()
            logits = models[name](list(window))
            tallies[name].seconds += time.perf_counter() - start
            log_probs = torch.log_softmax(logits[:-1].double(), dim=-1)
            if ref_log_probs is None:
                ref_log_probs = log_probs
            tallies[name].add(log_probs, ref_log_probs, targets)
        if progress is not None:
            progress(done, len(windows))
    return {name: tallies[name].figures() for name in models}
