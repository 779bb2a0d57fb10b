"""Fused q/k/v and gate/up projections compute exactly what the separate projections compute."""

from __future__ import annotations

import pytest
import torch

from kernels.w4a16_format import quantize_rtn
from runtime.fused_linear import fuse_linears
from runtime.linear import DenseLinear, Int4Linear, Linear


def _dense(n: int, k: int, seed: int, bias: bool = False) -> DenseLinear:
    g = torch.Generator().manual_seed(seed)
    return DenseLinear(torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_dense_fusion_is_bit_identical_and_keeps_one_copy(bias: bool, rows: int) -> None:
    parts: list[Linear] = [_dense(96, 64, 1, bias), _dense(32, 64, 2, bias), _dense(32, 64, 3, bias)]
    x = torch.randn(rows, 64)
    expected = [p(x) for p in parts]
    fused = fuse_linears(parts)
    assert fused is not None
    linear, views = fused
    got = linear.split(linear(x))
    for e, g, v in zip(expected, got, views, strict=True):
        assert torch.equal(e, g)
        assert torch.equal(e, v(x))
        # The rebuilt parts are views of the fused weight: the block holds the weights once.
        assert isinstance(v, DenseLinear) and v.weight.untyped_storage().data_ptr() == (
            linear.weight.untyped_storage().data_ptr() if linear.weight is not None else -1
        )


def test_int4_fusion_matches_the_separate_projections() -> None:
    g = torch.Generator().manual_seed(0)
    parts: list[Linear] = [
        Int4Linear(quantize_rtn(torch.randn(n, 64, generator=g), 32), None) for n in (64, 32, 32)
    ]
    x = torch.randn(3, 64)
    expected = [p(x) for p in parts]
    fused = fuse_linears(parts)
    assert fused is not None
    for e, got in zip(expected, fused[0].split(fused[0](x)), strict=True):
        assert torch.equal(e, got)


def test_mixed_kinds_or_partial_biases_are_not_fused() -> None:
    g = torch.Generator().manual_seed(0)
    int4 = Int4Linear(quantize_rtn(torch.randn(32, 64, generator=g), 32), None)
    assert fuse_linears([_dense(32, 64, 1), int4]) is None
    assert fuse_linears([_dense(32, 64, 1, bias=True), _dense(32, 64, 2)]) is None
