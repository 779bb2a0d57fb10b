"""Sampler tests: each parameter is checked in a case where ignoring it gives a different answer."""

from __future__ import annotations

import pytest
import torch

from runtime.request import Request
from runtime.sampler import Sampler
from runtime.sampling_params import SamplingParams

NUM_DRAWS = 4000


def make_request(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: frozenset[int] = frozenset(),
    request_id: str = "r",
) -> Request:
    request = Request(request_id, prompt or [1], params, eos_token_ids=eos)
    for token in output or []:
        request.append_output_token(token)
    return request


def draw_many(probs: list[float], params: SamplingParams, num_draws: int = NUM_DRAWS) -> torch.Tensor:
    """Sample ``num_draws`` times from one distribution (one batch of identical rows); return frequencies."""
    logits = torch.tensor(probs).log().expand(num_draws, -1).contiguous()
    requests = [make_request(params) for _ in range(num_draws)]
    tokens = torch.tensor(Sampler(seed=7)(logits, requests).token_ids)
    return torch.bincount(tokens, minlength=len(probs)).float() / num_draws


def random_logits(rows: int, vocab: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale


def test_greedy_is_argmax_including_mixed_batches_and_bf16() -> None:
    # Nearly flat logits: any random sampling would rarely agree with the argmax.
    logits = random_logits(32, 200, scale=0.05)
    greedy = SamplingParams(temperature=0.0)
    expected = logits.argmax(dim=-1).tolist()
    assert Sampler()(logits, [make_request(greedy) for _ in range(32)]).token_ids == expected

    bf16 = logits.to(torch.bfloat16)
    out = Sampler()(bf16, [make_request(greedy) for _ in range(32)]).token_ids
    assert out == bf16.float().argmax(dim=-1).tolist()

    mixed = [make_request(greedy if i % 2 == 0 else SamplingParams(temperature=1.0)) for i in range(32)]
    tokens = Sampler()(logits, mixed).token_ids
    assert [tokens[i] for i in range(0, 32, 2)] == expected[0::2]
    assert [tokens[i] for i in range(1, 32, 2)] != expected[1::2]


def test_temperature_reshapes_the_distribution() -> None:
    logits = [2.0, 1.0, 0.0, -1.0]
    probs = torch.tensor(logits).softmax(-1).tolist()
    for temperature in (0.5, 2.0):
        freq = draw_many(probs, SamplingParams(temperature=temperature))
        expected = (torch.tensor(logits) / temperature).softmax(-1)
        assert torch.allclose(freq, expected, atol=0.03), (temperature, freq, expected)
        assert (freq - torch.tensor(probs)).abs().max() > 0.1


def test_temperature_one_matches_probabilities() -> None:
    probs = [0.1, 0.2, 0.3, 0.4]
    freq = draw_many(probs, SamplingParams(temperature=1.0))
    assert torch.allclose(freq, torch.tensor(probs), atol=0.03)


def test_top_k_one_picks_the_max_and_top_k_bounds_the_support() -> None:
    logits = random_logits(500, 50, scale=0.5, seed=1)
    top1 = [make_request(SamplingParams(top_k=1)) for _ in range(500)]
    assert Sampler()(logits, top1).token_ids == logits.argmax(dim=-1).tolist()

    row = random_logits(1, 50, scale=0.5, seed=2).expand(NUM_DRAWS, -1).contiguous()
    tokens = Sampler()(row, [make_request(SamplingParams(top_k=3)) for _ in range(NUM_DRAWS)]).token_ids
    assert set(tokens) == set(row[0].topk(3).indices.tolist())


def test_top_p_excludes_the_tail() -> None:
    probs = [0.05, 0.3, 0.05, 0.5, 0.1]  # unsorted on purpose
    freq = draw_many(probs, SamplingParams(top_p=0.7))
    assert freq[[0, 2, 4]].sum() == 0
    assert freq[3] == pytest.approx(0.5 / 0.8, abs=0.03)
    # 0.5 + 0.3 < 0.85, so the 0.1 token is still needed to reach p.
    freq = draw_many(probs, SamplingParams(top_p=0.85))
    assert freq[[0, 2]].sum() == 0 and freq[4] > 0


def test_top_p_with_a_wide_nucleus_matches_a_sorted_reference() -> None:
    # Flat logits over 3000 tokens: the nucleus is wider than the first candidate rounds.
    row = random_logits(1, 3000, scale=0.1, seed=3)[0]
    probs = row.softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs
    nucleus = set(order[before < 0.5].tolist())
    assert len(nucleus) > 1024
    batch = row.expand(1000, -1).contiguous()
    tokens = Sampler()(batch, [make_request(SamplingParams(top_p=0.5)) for _ in range(1000)]).token_ids
    assert set(tokens) <= nucleus
    assert len(set(tokens)) > 500


def test_top_p_renormalises_after_top_k() -> None:
    # After top_k=2 the survivors are 4/7 and 3/7; 4/7 alone reaches p=0.5.
    freq = draw_many([0.4, 0.3, 0.2, 0.1], SamplingParams(top_k=2, top_p=0.5))
    assert freq[0] == 1.0


def test_min_p_drops_tokens_below_a_fraction_of_the_max() -> None:
    probs = [0.1, 0.5, 0.1, 0.3]
    freq = draw_many(probs, SamplingParams(min_p=0.3))  # threshold 0.15
    assert freq[[0, 2]].sum() == 0
    assert freq[1] == pytest.approx(0.5 / 0.8, abs=0.03)


def test_presence_penalty_applies_to_output_tokens_only() -> None:
    logits = torch.tensor([[1.0, 0.9, -5.0]])
    penalised = SamplingParams(temperature=0.0, presence_penalty=0.5)
    assert Sampler()(logits, [make_request(penalised, output=[0])]).token_ids == [1]
    assert Sampler()(logits, [make_request(penalised, prompt=[0, 0, 0])]).token_ids == [0]
    assert Sampler()(logits, [make_request(SamplingParams(temperature=0.0), output=[0])]).token_ids == [0]


def test_frequency_penalty_scales_with_the_count() -> None:
    logits = torch.tensor([[1.0, 0.85, -5.0]])
    output = [0, 0, 0, 1]
    by_frequency = SamplingParams(temperature=0.0, frequency_penalty=0.1)  # 0.7 vs 0.75
    by_presence = SamplingParams(temperature=0.0, presence_penalty=0.1)  # 0.9 vs 0.75
    assert Sampler()(logits, [make_request(by_frequency, output=output)]).token_ids == [1]
    assert Sampler()(logits, [make_request(by_presence, output=output)]).token_ids == [0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    positive = torch.tensor([[2.0, 1.4, -5.0]])  # 2.0 / 1.5 = 1.33 < 1.4
    negative = torch.tensor([[-1.0, -1.4, -5.0]])  # -1.0 * 1.5 = -1.5 < -1.4
    for logits in (positive, negative):
        assert Sampler()(logits, [make_request(params, prompt=[0])]).token_ids == [1]
        assert Sampler()(logits, [make_request(params, prompt=[2], output=[0])]).token_ids == [1]
        assert Sampler()(logits, [make_request(params, prompt=[2])]).token_ids == [0]


def test_penalties_only_touch_their_own_rows() -> None:
    logits = torch.tensor([[1.0, 0.9, -5.0]] * 3)
    requests = [
        make_request(SamplingParams(temperature=0.0), output=[0]),
        make_request(SamplingParams(temperature=0.0, presence_penalty=0.5), output=[0]),
        make_request(SamplingParams(temperature=0.0), output=[0]),
    ]
    assert Sampler()(logits, requests).token_ids == [0, 1, 0]


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # eos=3 is best, stop token 2 next
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2,))
    eos = frozenset({3})
    assert Sampler()(logits, [make_request(params, output=[0], eos=eos)]).token_ids == [1]
    assert Sampler()(logits, [make_request(params, output=[0, 0], eos=eos)]).token_ids == [3]

    random_rows = [make_request(SamplingParams(min_tokens=5), eos=eos) for _ in range(NUM_DRAWS)]
    tokens = Sampler()(logits.expand(NUM_DRAWS, -1).contiguous(), random_rows).token_ids
    assert 3 not in tokens


def test_ignore_eos_does_not_mask_eos_in_the_sampler() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    assert Sampler()(logits, [make_request(params, eos=frozenset({3}))]).token_ids == [3]


def test_logprobs_come_from_raw_logits_with_sorted_top_n() -> None:
    logits = random_logits(3, 40, scale=2.0, seed=4)
    params = [
        SamplingParams(temperature=0.7, top_k=5, presence_penalty=1.0, logprobs=4),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0),
    ]
    requests = [make_request(p, output=[int(logits[0].argmax())]) for p in params]
    out = Sampler()(logits, requests)
    reference = torch.log_softmax(logits, dim=-1)

    first = out.logprobs[0]
    assert first is not None and first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(reference[0, out.token_ids[0]].item(), abs=1e-5)
    assert [t for t, _ in first.top] == reference[0].topk(4).indices.tolist()
    values = [v for _, v in first.top]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(reference[0].topk(4).values.tolist(), abs=1e-5)

    second = out.logprobs[1]
    assert second is not None and second.top == []
    assert second.logprob == pytest.approx(reference[1].max().item(), abs=1e-5)
    assert out.logprobs[2] is None


def test_logprobs_of_bf16_logits_are_computed_in_fp32() -> None:
    logits = random_logits(2, 30, scale=3.0, seed=5).to(torch.bfloat16)
    out = Sampler()(logits, [make_request(SamplingParams(temperature=0.0, logprobs=2)) for _ in range(2)])
    reference = torch.log_softmax(logits.float(), dim=-1)
    for row, entry in enumerate(out.logprobs):
        assert entry is not None
        assert entry.logprob == pytest.approx(reference[row].max().item(), abs=1e-5)


def _seeded_run(seed: int, row: int, batch: int, steps: int = 8) -> list[int]:
    """Tokens of a seeded request placed at ``row`` among unseeded and differently seeded rows."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    target = make_request(params, request_id="target")
    neighbours = [
        make_request(SamplingParams(temperature=0.8, seed=99 if i % 2 else None, top_k=10 * (i % 3)))
        for i in range(batch - 1)
    ]
    requests = [*neighbours[:row], target, *neighbours[row:]]
    sampler = Sampler(seed=row)
    tokens = []
    for step in range(steps):
        logits = random_logits(batch, 1000, scale=0.5, seed=step)
        # The target row sees the same logits however the batch is laid out.
        logits[row] = random_logits(1, 1000, scale=0.5, seed=1000 + step)[0]
        tokens.append(sampler(logits, requests).token_ids[row])
    return tokens


def test_seeded_requests_are_reproducible_regardless_of_neighbours() -> None:
    alone = _seeded_run(1234, row=0, batch=1)
    assert _seeded_run(1234, row=3, batch=8) == alone
    assert _seeded_run(1234, row=5, batch=6) == alone
    assert _seeded_run(4321, row=0, batch=1) != alone


def test_unseeded_rows_use_the_samplers_generator_not_the_global_rng() -> None:
    logits = random_logits(16, 500, scale=0.5, seed=6)

    def run(seed: int) -> list[int]:
        return Sampler(seed=seed)(logits, [make_request(SamplingParams()) for _ in range(16)]).token_ids

    global_state = torch.get_rng_state()
    first = run(0)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert run(0) == first
    assert run(1) != first


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(2, 10), [make_request(SamplingParams())])


def test_penalties_reject_token_ids_outside_the_vocab() -> None:
    params = SamplingParams(presence_penalty=1.0)
    with pytest.raises(ValueError, match="out of range"):
        Sampler()(torch.zeros(1, 10), [make_request(params, output=[12])])


def test_empty_batch() -> None:
    out = Sampler()(torch.zeros(0, 10), [])
    assert out.token_ids == [] and out.logprobs == []
