"""The CPU int4 path against the fp32 dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch

from kernels.w4a16_cpu import CpuInt4Linear
from kernels.w4a16_format import PackedW4, dequantize, pack_codes, quantize_rtn, unpack_codes


def act_order(packed: PackedW4, seed: int) -> PackedW4:
    """The same weights stored act-order: input rows shuffled, groups named through g_idx."""
    gen = torch.Generator().manual_seed(seed)
    k = packed.in_features
    perm = torch.randperm(k, generator=gen)
    dense = dequantize(packed)
    shuffled = quantize_rtn(dense[:, perm], packed.group_size)
    # Row perm[j] of the original is row j of the shuffled one, in group j // g.
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // packed.group_size).to(torch.int32)
    codes = torch.empty(k, packed.out_features, dtype=torch.int32)
    codes[perm] = unpack_codes(shuffled.qweight)
    return PackedW4(pack_codes(codes), shuffled.scales, shuffled.zeros, packed.group_size, g_idx)


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("ordered", [False, True])
def test_int4_matmul_matches_the_reference(m: int, group_size: int, ordered: bool) -> None:
    gen = torch.Generator().manual_seed(m * 7 + group_size)
    w = torch.randn(48, 256, generator=gen)
    packed = quantize_rtn(w, group_size)
    if ordered:
        packed = act_order(packed, seed=m)
        assert packed.g_idx is not None
    layer = CpuInt4Linear(packed)
    assert layer.fast
    x = torch.randn(m, 256, generator=gen)
    ref = x @ dequantize(packed).t()
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (m, 48)
    # Activations go through bf16 (8 bits of mantissa): compare relative to the output's scale.
    assert float((out - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


def test_unsupported_group_size_falls_back_exactly() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 96, generator=gen)
    packed = quantize_rtn(w, group_size=16)
    layer = CpuInt4Linear(packed, bias=torch.ones(24))
    assert not layer.fast
    x = torch.randn(5, 96, generator=gen)
    assert torch.allclose(layer(x), x @ dequantize(packed).t() + 1, atol=1e-5)


def test_leading_dims_and_bias_on_the_fast_path() -> None:
    gen = torch.Generator().manual_seed(4)
    packed = quantize_rtn(torch.randn(32, 128, generator=gen), group_size=32, symmetric=True)
    bias = torch.randn(32, generator=gen)
    layer = CpuInt4Linear(packed, bias=bias)
    x = torch.randn(2, 3, 128, generator=gen)
    ref = x @ dequantize(packed).t() + bias
    out = layer(x)
    assert out.shape == (2, 3, 32)
    assert float((out - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
    assert layer.nbytes < 32 * 128 * 4 / 4  # codes, scales and offsets: under a quarter of fp32
