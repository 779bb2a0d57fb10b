"""Row ranges (slices where rows are contiguous), slice-based LoRA deltas and the vocabulary-chunked head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.lora import DeltaGroups, LayerLora, LoraProjection
from runtime.row_ranges import as_rows, coalesce, localize, split
from runtime.vocab_linear import VOCAB_CHUNK, vocab_linear

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def test_coalesce_merges_touching_and_drops_empty() -> None:
    assert coalesce([(5, 7), (0, 2), (2, 3), (4, 4), (6, 9)]) == [(0, 3), (5, 9)]


def test_as_rows_picks_the_cheapest_index() -> None:
    assert as_rows([(0, 10)], 10) is None
    assert as_rows([(2, 6)], 10) == slice(2, 6)
    rows = as_rows([(0, 2), (5, 7)], 10)
    assert isinstance(rows, torch.Tensor) and rows.tolist() == [0, 1, 5, 6]


def test_localize_gives_positions_in_the_gathered_rows() -> None:
    within = [(2, 5), (8, 12)]  # gathered as rows 2 3 4 8 9 10 11
    assert localize([(3, 9)], within) == [(1, 4)]
    assert localize([(0, 2), (12, 20)], within) == []
    assert localize([(2, 5), (8, 12)], within) == [(0, 7)]


def test_split_keeps_order_and_limit() -> None:
    parts = split([(0, 3), (5, 10)], 4)
    assert parts == [[(0, 3), (5, 6)], [(6, 10)]]


def _lora(rank: int, seed: int) -> LayerLora:
    g = torch.Generator().manual_seed(seed)
    return LayerLora(
        {
            name: LoraProjection(torch.randn(rank, 16, generator=g), torch.randn(out, rank, generator=g), 0.5)
            for name, out in (("self_attn.q_proj", 16), ("self_attn.v_proj", 8))
        }
    )


def test_slice_and_index_segments_add_the_same_deltas() -> None:
    h = torch.randn(10, 16)
    outs = [torch.randn(10, 16), torch.randn(10, 8), torch.randn(10, 8)]
    a, b = _lora(4, 0), _lora(2, 1)
    by_slice = DeltaGroups([(a, slice(0, 6)), (b, slice(6, 10))])
    by_index = DeltaGroups([(a, torch.arange(0, 6)), (b, torch.arange(6, 10))])
    got = by_slice.add_fused(QKV, h, [o.clone() for o in outs])
    want = by_index.add_fused(QKV, h, [o.clone() for o in outs])
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y)


def test_vocab_linear_matches_f_linear() -> None:
    for rows, vocab in ((1, 3 * VOCAB_CHUNK + 17), (33, 2 * VOCAB_CHUNK), (4, VOCAB_CHUNK - 1)):
        h, w = torch.randn(rows, 64), torch.randn(vocab, 64)
        torch.testing.assert_close(vocab_linear(h, w), F.linear(h, w))
