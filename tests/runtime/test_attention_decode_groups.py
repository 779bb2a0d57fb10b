"""Decode rows grouped by context length attend exactly as each row alone would."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from runtime.attention import AttentionMetadata, new_layer_kv, paged_attention, split_sorted_lengths

HEADS, KV_HEADS, DIM, PAGE = 4, 2, 8, 4


def padded_cost(lengths: list[int], ranges: list[tuple[int, int]], group_cost: int) -> int:
    return sum((end - start) * lengths[start] + group_cost for start, end in ranges)


def test_split_covers_every_row_in_order() -> None:
    lengths = sorted((random.Random(0).randrange(1, 500) for _ in range(100)), reverse=True)
    ranges = split_sorted_lengths(lengths, group_cost=50)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(start < end for start, end in ranges)


def test_equal_lengths_stay_one_group() -> None:
    assert split_sorted_lengths([37] * 64, group_cost=10) == [(0, 64)]


def test_a_few_long_rows_get_their_own_group() -> None:
    lengths = [1000] * 4 + [10] * 60
    ranges = split_sorted_lengths(lengths, group_cost=96)
    assert ranges == [(0, 4), (4, 64)]
    assert padded_cost(lengths, ranges, 96) < padded_cost(lengths, [(0, 64)], 96)


def reference_row(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None
) -> torch.Tensor:
    """One decode row, attended alone and unpadded: q [H, D], keys/values [L, KVH, D]."""
    length = keys.shape[0]
    start = 0 if window is None else max(0, length - window)
    k = keys[start:].transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, dim=0)
    v = values[start:].transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, dim=0)
    return F.scaled_dot_product_attention(q[:, None], k, v)[:, 0]


@pytest.mark.parametrize("window", [None, 5])
def test_grouped_decode_matches_rows_attended_alone(window: int | None) -> None:
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    # Two very long contexts among short ones: the planner must split them into several groups.
    lengths = [300, 280] + [rng.randrange(1, 12) for _ in range(30)]
    num_pages = sum((n + PAGE - 1) // PAGE for n in lengths) + 1
    kv = new_layer_kv(num_pages * PAGE, KV_HEADS, DIM, torch.float32)
    kv.key.copy_(torch.randn(kv.key.shape, generator=gen))
    kv.value.copy_(torch.randn(kv.value.shape, generator=gen))
    pages = list(range(1, num_pages))
    rng.shuffle(pages)
    tables, width = [], max(lengths)
    for n in lengths:
        tables.append([pages.pop() for _ in range((n + PAGE - 1) // PAGE)])
    slots = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, (n, table) in enumerate(zip(lengths, tables, strict=True)):
        slots[row, :n] = torch.tensor([table[p // PAGE] * PAGE + p % PAGE for p in range(n)])
    lengths_t = torch.tensor(lengths)
    q = torch.randn(len(lengths), HEADS, DIM, generator=gen)
    # The step's own k/v are the last slot of every row: write back what is already there.
    last = slots[torch.arange(len(lengths)), lengths_t - 1]
    meta = AttentionMetadata(
        slot_mapping=last,
        num_decode_rows=len(lengths),
        decode_slots=slots,
        decode_positions=lengths_t - 1,
        decode_lengths=lengths_t,
        prefills=[],
    )
    out = paged_attention(q, kv.key[last].clone(), kv.value[last].clone(), meta, kv, window)
    assert len(meta.decode_groups()) > 1
    for row, n in enumerate(lengths):
        ctx = slots[row, :n]
        expected = reference_row(q[row], kv.key[ctx], kv.value[ctx], window)
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)
