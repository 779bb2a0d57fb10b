"""Batched logits transforms for the sampler: penalties, min-tokens masking, temperature, truncation.

Each function takes a float32 ``[B, V]`` tensor and one parameter per row, so the sampler can hand
it only the rows that asked for the transform. All but :func:`truncate` edit the logits in place.
Nothing here knows about requests or models; the inputs are plain token-id lists and numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

_NEG_INF = float("-inf")


def _row_token_index(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-row token lists into (row, token) index tensors, rejecting ids outside the vocab."""
    lengths = torch.tensor([len(tokens) for tokens in token_lists], dtype=torch.long)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"token id out of range for vocab size {vocab_size}")
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    return rows.to(device), tokens.to(device)


def _flat_positions(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Positions ``row * V + token`` of every listed token in a flattened ``[B, V]`` tensor."""
    rows, tokens = _row_token_index(token_lists, vocab_size, device)
    return rows * vocab_size + tokens


def _per_row(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    presence_penalties: Sequence[float],
    frequency_penalties: Sequence[float],
    repetition_penalties: Sequence[float],
) -> None:
    """Apply repetition, then frequency and presence penalties (vLLM order and semantics).

    Repetition (HF/CTRL): tokens seen in prompt or output have positive logits divided and
    negative logits multiplied by the penalty. Frequency and presence (OpenAI): subtract
    ``frequency * count`` and ``presence * (count > 0)`` over output tokens only.

    Only the (row, token) cells that occur are read and written: a few hundred per row
    instead of dense ``[B, V]`` count tensors, which cost several times more on a CPU.
    """
    if not logits.is_contiguous():
        raise ValueError("apply_penalties needs contiguous logits")
    vocab_size = logits.shape[1]
    use_repetition = any(p != 1.0 for p in repetition_penalties)
    use_frequency = any(p != 0.0 for p in frequency_penalties)
    use_presence = any(p != 0.0 for p in presence_penalties)
    if not (use_repetition or use_frequency or use_presence):
        return
    flat = logits.view(-1)
    output_cells, counts = torch.unique(
        _flat_positions(output_token_ids, vocab_size, logits.device), return_counts=True
    )
    if use_repetition:
        prompt_cells = _flat_positions(prompt_token_ids, vocab_size, logits.device)
        seen = torch.unique(torch.cat([prompt_cells, output_cells]))
        penalty = _per_row(repetition_penalties, logits)[seen // vocab_size]
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if use_frequency or use_presence:
        rows = output_cells // vocab_size
        frequency = _per_row(frequency_penalties, logits)[rows]
        presence = _per_row(presence_penalties, logits)[rows]
        flat[output_cells] -= frequency * counts + presence


def mask_tokens(logits: torch.Tensor, token_lists: Sequence[Sequence[int]]) -> None:
    """Set the listed token ids of each row to -inf; ids outside the vocab are ignored.

    Used for min_tokens: ids beyond the logits' width can never be sampled, so there is
    nothing to mask for them.
    """
    vocab_size = logits.shape[1]
    in_vocab = [[t for t in tokens if 0 <= t < vocab_size] for tokens in token_lists]
    rows, tokens = _row_token_index(in_vocab, vocab_size, logits.device)
    if tokens.numel():
        logits[rows, tokens] = _NEG_INF


def apply_temperature(logits: torch.Tensor, temperatures: Sequence[float]) -> None:
    """Divide each row by its (positive) temperature."""
    if any(t != 1.0 for t in temperatures):
        logits.div_(_per_row(temperatures, logits).unsqueeze(1))


class Candidates(NamedTuple):
    """Surviving tokens of some rows after truncation, best first.

    ``rows`` are positions in the logits given to :func:`truncate`; ``token_ids`` and ``weights``
    are ``[len(rows), K]``. Weights are unnormalised probabilities, zero for dropped candidates.
    """

    rows: list[int]
    token_ids: torch.Tensor
    weights: torch.Tensor


# Candidate widths tried in turn before the full vocabulary: a real next-token distribution
# almost always keeps its nucleus in the first few dozen tokens, so a full sort is the rare case.
_CANDIDATE_WIDTHS = (64, 1024)


def truncate(
    logits: torch.Tensor, top_ks: Sequence[int], top_ps: Sequence[float], min_ps: Sequence[float]
) -> list[Candidates]:
    """Apply min_p, then top-k, then top-p (vLLM v1 order) and return each row's survivors.

    min_p keeps tokens with ``p >= min_p * p_max``, i.e. logits ``>= max + log(min_p)``. Top-k
    keeps the ``k`` best of those (``k <= 0``: all). Top-p renormalises over what is left and
    keeps, best first, every token whose predecessors hold less than ``p`` of the mass: the
    smallest set reaching ``p`` (the same rule as vLLM's ascending cumsum ``<= 1 - p``).

    Masking a whole ``[B, V]`` row and sorting it are the slow parts on a CPU, so this reads the
    ``topk`` candidates instead and widens them only for rows whose kept set they might not
    contain. The caller samples from the returned candidates directly.
    """
    batch, vocab_size = logits.shape
    rows = _RowParams(
        ks=[k if 0 < k < vocab_size else vocab_size for k in top_ks],
        ps=[p if p < 1.0 else 2.0 for p in top_ps],  # 2.0: a mass no prefix can reach
        log_min_ps=[math.log(m) if m > 0.0 else _NEG_INF for m in min_ps],
    )
    needs_full_norm = [
        k == vocab_size and lm == _NEG_INF and p <= 1.0
        for k, p, lm in zip(rows.ks, rows.ps, rows.log_min_ps, strict=True)
    ]
    full_lse = logits.logsumexp(dim=-1) if any(needs_full_norm) else None
    groups: list[Candidates] = []
    pending = list(range(batch))
    for width in (*_CANDIDATE_WIDTHS, vocab_size):
        group, pending = _truncate_round(logits, rows, full_lse, pending, width)
        if group.rows:
            groups.append(group)
        if not pending:
            break
    return groups


class _RowParams(NamedTuple):
    ks: list[int]
    ps: list[float]
    log_min_ps: list[float]


def _truncate_round(
    logits: torch.Tensor, params: _RowParams, full_lse: torch.Tensor | None, rows: list[int], width: int
) -> tuple[Candidates, list[int]]:
    """Truncate ``rows`` over their best ``width`` candidates; return the rows that need more."""
    vocab_size = logits.shape[1]
    device = logits.device
    index = torch.tensor(rows, dtype=torch.long, device=device)
    subset = logits if len(rows) == logits.shape[0] else logits.index_select(0, index)
    num_candidates = min(vocab_size, max([width, *(params.ks[r] for r in rows if params.ks[r] < vocab_size)]))
    values, token_ids = subset.topk(num_candidates, dim=-1)

    k = torch.tensor([min(params.ks[r], num_candidates) for r in rows], device=device)
    has_top_k = torch.tensor([params.ks[r] < vocab_size for r in rows], device=device)
    log_min_p = torch.tensor([params.log_min_ps[r] for r in rows], dtype=values.dtype, device=device)
    has_min_p = log_min_p > _NEG_INF
    min_p_floor = values[:, 0] + log_min_p
    keep = torch.arange(num_candidates, device=device).unsqueeze(0) < k.unsqueeze(1)
    keep &= values >= min_p_floor.unsqueeze(1)

    # Where the top-p input set surely lies inside the candidates, normalise over it; otherwise
    # (no top-k, no min_p) over the whole row.
    all_seen = num_candidates == vocab_size
    local = has_top_k | (has_min_p & (values[:, -1] < min_p_floor)) | all_seen
    norm = values.masked_fill(~keep, _NEG_INF).logsumexp(dim=-1)
    if full_lse is not None:
        norm = torch.where(local, norm, full_lse.index_select(0, index))
    probs = (values - norm.unsqueeze(1)).exp_().mul_(keep)
    cumulative = probs.cumsum(dim=-1)
    p = torch.tensor([params.ps[r] for r in rows], dtype=probs.dtype, device=device)
    keep &= (cumulative - probs) < p.unsqueeze(1)
    # The most likely token always survives, however small top_p is (it may round to zero).
    keep[:, 0] = True
    covered = local | (~has_min_p & (cumulative[:, -1] >= p))

    covered_list: list[bool] = covered.tolist()
    done = covered.nonzero().squeeze(1)
    group = Candidates(
        rows=[r for r, ok in zip(rows, covered_list, strict=True) if ok],
        token_ids=token_ids.index_select(0, done),
        weights=probs.mul_(keep).index_select(0, done),
    )
    return group, [r for r, ok in zip(rows, covered_list, strict=True) if not ok]
