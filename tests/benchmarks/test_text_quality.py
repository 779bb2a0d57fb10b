"""Perplexity, KL and top-1 agreement against figures worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.text_quality import QualityTally, evaluate


def _logits(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly `rows` (each row a distribution)."""
    return torch.tensor(rows, dtype=torch.float64).log()


def test_two_token_vocabulary_by_hand() -> None:
    # reference p = (3/4, 1/4), model q = (1/4, 3/4) at both scored positions; the next token is 0.
    models = {
        "ref": lambda ids: _logits([0.75, 0.25], [0.75, 0.25], [0.5, 0.5]),
        "model": lambda ids: _logits([0.25, 0.75], [0.25, 0.75], [0.9, 0.1]),
    }
    figures = evaluate(models, "ref", [[1, 0, 0]])
    ref, model = figures["ref"], figures["model"]
    assert ref.positions == model.positions == 2  # the last position has no next token
    assert ref.perplexity == pytest.approx(4 / 3)  # exp(-ln 3/4)
    assert model.perplexity == pytest.approx(4.0)  # exp(-ln 1/4)
    # KL(p || q) = 3/4 ln 3 + 1/4 ln(1/3) = 1/2 ln 3 at each position
    assert model.mean_kl == pytest.approx(0.5 * math.log(3))
    assert ref.mean_kl == 0.0 and ref.top1_agreement == 1.0
    assert model.top1_agreement == 0.0


def test_figures_average_over_windows_by_position() -> None:
    same = _logits([0.5, 0.5], [0.5, 0.5])
    models = {"ref": lambda ids: same, "twin": lambda ids: same.clone()}
    figures = evaluate(models, "ref", [[0, 1], [1, 0]])
    assert figures["twin"].perplexity == pytest.approx(2.0)
    assert figures["twin"].mean_kl == 0.0 and figures["twin"].top1_agreement == 1.0
    assert figures["twin"].positions == 2


def test_zero_reference_probability_adds_nothing_to_kl() -> None:
    tally = QualityTally()
    ref = torch.tensor([[0.0, -math.inf]], dtype=torch.float64)  # p = (1, 0)
    q = torch.tensor([[math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    tally.add(q, ref, torch.tensor([0]))
    assert tally.figures().mean_kl == pytest.approx(math.log(2))


def test_bad_input_is_refused() -> None:
    models = {"ref": lambda ids: _logits([0.5, 0.5])}
    with pytest.raises(ValueError, match="reference"):
        evaluate(models, "nope", [[0, 1]])
    with pytest.raises(ValueError, match="two tokens"):
        evaluate(models, "ref", [[0]])
    with pytest.raises(ValueError, match="no positions"):
        QualityTally().figures()
