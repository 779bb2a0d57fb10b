"""Batched token sampling: one call picks the next token for every sampling row of a step."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from runtime.logits_processors import apply_penalties, apply_temperature, mask_tokens, truncate
from runtime.request import Request
from runtime.sampling_params import SamplingParams


class TokenLogprobs(NamedTuple):
    """Log-probability of the sampled token plus the top-n alternatives (best first).

    Both come from the raw model logits, before penalties, temperature or truncation.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class SamplerOutput(NamedTuple):
    """One token per row, and its logprobs where the request asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class _BatchPlan(NamedTuple):
    """Which rows need which work, found with one pass over the requests."""

    greedy_rows: list[int]
    random_rows: list[int]
    penalty_rows: list[int]
    # Row -> token ids that min_tokens forbids this step (EOS and stop tokens).
    banned: dict[int, list[int]]
    logprob_rows: list[int]

    @staticmethod
    def build(requests: list[Request]) -> _BatchPlan:
        plan = _BatchPlan([], [], [], {}, [])
        for row, request in enumerate(requests):
            params = request.params
            (plan.greedy_rows if params.greedy else plan.random_rows).append(row)
            if params.uses_penalties:
                plan.penalty_rows.append(row)
            if request.num_output_tokens < params.min_tokens:
                banned = [*request.eos_token_ids, *params.stop_token_ids]
                if banned:
                    plan.banned[row] = banned
            if params.logprobs is not None:
                plan.logprob_rows.append(row)
        return plan


def _on_rows(logits: torch.Tensor, rows: list[int], transform: Callable[[torch.Tensor], None]) -> None:
    """Run an in-place transform on a subset of rows (the whole tensor when that is all rows)."""
    if len(rows) == logits.shape[0]:
        transform(logits)
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    subset = logits.index_select(0, index)
    transform(subset)
    logits.index_copy_(0, index, subset)


class Sampler:
    """Picks one token per row of a ``[B, V]`` logits batch, following each request's params.

    Order (as in vLLM v1): penalties, then the min_tokens mask; temperature-0 rows take the
    argmax; the other rows go through temperature, then min_p, top-k and top-p (see
    :func:`runtime.logits_processors.truncate`), then inverse-CDF sampling with one uniform
    draw per row. A seeded request draws from its own generator (exactly one number per step),
    so its tokens do not depend on its batch neighbours; unseeded rows share the sampler's own
    generator, never the global RNG. Work is only done for the rows that need it; an
    all-greedy batch without penalties or min_tokens is a single argmax over the batch.
    """

    def __init__(self, seed: int = 0) -> None:
        # Uniforms are drawn on the CPU (one per row) whatever device the logits are on.
        self._generator = torch.Generator()
        self._generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(
                f"logits must be [num_requests, vocab];"
                f" got {tuple(logits.shape)} for {len(requests)} requests"
            )
        if not requests:
            return SamplerOutput([], [])
        plan = _BatchPlan.build(requests)
        if plan.random_rows or plan.penalty_rows or plan.banned:
            tokens = self._sample(logits, requests, plan)
        elif logits.dtype != torch.float32 and logits.device.type == "cpu":
            # CPU argmax over bf16/fp16 is several times slower than converting first.
            tokens = logits.float().argmax(dim=-1)
        else:
            tokens = logits.argmax(dim=-1)
        token_ids: list[int] = tokens.tolist()
        if plan.logprob_rows:
            logprobs = _logprobs(logits, requests, plan.logprob_rows, token_ids)
        else:
            logprobs = [None] * len(requests)
        return SamplerOutput(token_ids, logprobs)

    def _sample(self, logits: torch.Tensor, requests: list[Request], plan: _BatchPlan) -> torch.Tensor:
        # Copy so the caller's logits (and the raw logprobs taken from them) stay untouched.
        work = logits.to(torch.float32, copy=True)
        if plan.penalty_rows:
            penalised = [requests[row] for row in plan.penalty_rows]
            _on_rows(
                work,
                plan.penalty_rows,
                lambda rows: apply_penalties(
                    rows,
                    [r.prompt_token_ids for r in penalised],
                    [r.output_token_ids for r in penalised],
                    [r.params.presence_penalty for r in penalised],
                    [r.params.frequency_penalty for r in penalised],
                    [r.params.repetition_penalty for r in penalised],
                ),
            )
        if plan.banned:
            mask_tokens(work, [plan.banned.get(row, []) for row in range(len(requests))])
        if plan.greedy_rows:
            tokens = work.argmax(dim=-1)
        else:
            tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        if plan.random_rows:
            rows = plan.random_rows
            chosen = [requests[row] for row in rows]
            if len(rows) == len(requests):
                tokens = self._sample_random(work, chosen)
            else:
                index = torch.tensor(rows, dtype=torch.long, device=logits.device)
                tokens.index_copy_(0, index, self._sample_random(work.index_select(0, index), chosen))
        return tokens

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        uniforms = self._uniforms(requests, logits.device)
        apply_temperature(logits, [r.params.temperature for r in requests])
        truncated = [i for i, r in enumerate(requests) if _truncates(r.params)]
        if not truncated:
            return _inverse_cdf_sample(logits.softmax(dim=-1), uniforms)
        tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        plain = sorted(set(range(len(requests))) - set(truncated))
        if plain:
            index = torch.tensor(plain, dtype=torch.long, device=logits.device)
            probs = logits.index_select(0, index).softmax(dim=-1)
            tokens.index_copy_(0, index, _inverse_cdf_sample(probs, uniforms.index_select(0, index)))
        index = torch.tensor(truncated, dtype=torch.long, device=logits.device)
        subset = logits if not plain else logits.index_select(0, index)
        chosen = [requests[i] for i in truncated]
        groups = truncate(
            subset,
            [r.params.top_k for r in chosen],
            [r.params.top_p for r in chosen],
            [r.params.min_p for r in chosen],
        )
        for group in groups:
            rows = index.index_select(0, torch.tensor(group.rows, dtype=torch.long, device=logits.device))
            picked = _inverse_cdf_sample(group.weights, uniforms.index_select(0, rows))
            tokens.index_copy_(0, rows, group.token_ids.gather(1, picked.unsqueeze(1)).squeeze(1))
        return tokens

    def _uniforms(self, requests: list[Request], device: torch.device) -> torch.Tensor:
        """One U[0, 1) draw per row: from the request's own generator when it is seeded."""
        uniforms = torch.empty(len(requests), dtype=torch.float64)
        seeded = [(row, r.generator) for row, r in enumerate(requests) if r.generator is not None]
        if len(seeded) < len(requests):
            uniforms.uniform_(generator=self._generator)
        for row, generator in seeded:
            draw = torch.rand(1, dtype=torch.float64, device=generator.device, generator=generator)
            uniforms[row] = draw.item()
        return uniforms.to(device)


def _logprobs(
    logits: torch.Tensor, requests: list[Request], rows: list[int], token_ids: list[int]
) -> list[TokenLogprobs | None]:
    """Sampled-token and top-n logprobs from the raw logits, for the rows that asked."""
    if len(rows) == len(requests):
        raw = logits
    else:
        raw = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))
    log_probs = torch.log_softmax(raw, dim=-1, dtype=torch.float32)
    sampled_index = torch.tensor([token_ids[row] for row in rows], dtype=torch.long, device=logits.device)
    sampled: list[float] = log_probs.gather(1, sampled_index.unsqueeze(1)).squeeze(1).tolist()
    n_max = min(max(requests[row].params.logprobs or 0 for row in rows), log_probs.shape[1])
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if n_max > 0:
        values, ids = log_probs.topk(n_max, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    out: list[TokenLogprobs | None] = [None] * len(requests)
    for j, row in enumerate(rows):
        n = requests[row].params.logprobs or 0
        top = list(zip(top_ids[j][:n], top_values[j][:n], strict=True))
        out[row] = TokenLogprobs(token_ids[row], sampled[j], top)
    return out


def _truncates(params: SamplingParams) -> bool:
    return params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0


def _inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one index per row of ``probs`` (rows need not be normalised) from one uniform each.

    Needs ``B`` random numbers rather than ``B * V`` for a Gumbel or exponential race, which on
    the CPU is the difference between a microsecond and tens of milliseconds per step.
    Zero-probability tokens are never picked: ``right=True`` skips flat steps of the CDF.
    """
    weights = probs.to(torch.float64).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    # Keep the target strictly below the total so the search always lands on a real token.
    target = torch.minimum(uniforms.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # A row whose weights all vanished (extreme parameters underflow) falls back to its best token.
    degenerate = total.squeeze(1) <= 0
    if bool(degenerate.any()):
        picked = torch.where(degenerate, probs.nan_to_num(nan=float("-inf")).argmax(dim=-1), picked)
    return picked.clamp_(max=probs.shape[1] - 1)
