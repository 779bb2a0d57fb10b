"""Extreme but valid sampling parameters (found by fuzzing the API) always give a real token."""

from __future__ import annotations

import pytest
import torch

from runtime.request import Request
from runtime.sampler import Sampler
from runtime.sampling_params import SamplingParams, SamplingParamsError


def sample(params: SamplingParams, logits: torch.Tensor) -> list[int]:
    requests = [Request(str(i), [1, 2, 3], params) for i in range(logits.shape[0])]
    return Sampler(seed=0)(logits, requests).token_ids


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_p=5e-324),
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=5e-324, top_p=5e-324),
        SamplingParams(repetition_penalty=0.01, temperature=0.5),
        SamplingParams(top_k=1, top_p=1e-300, min_p=1.0),
    ],
)
def test_extreme_parameters_pick_a_valid_token(params: SamplingParams) -> None:
    logits = torch.randn(4, 512, generator=torch.Generator().manual_seed(1)) * 5
    tokens = sample(params, logits)
    assert all(0 <= t < 512 for t in tokens)
    if params.top_p < 1e-100 or params.greedy:
        assert tokens == logits.argmax(dim=-1).tolist()


def test_degenerate_repetition_penalty_is_rejected() -> None:
    with pytest.raises(SamplingParamsError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-44)
