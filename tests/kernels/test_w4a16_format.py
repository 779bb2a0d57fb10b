"""The canonical 4-bit layout: packing round trips, RTN quantization error, act-order groups."""

from __future__ import annotations

import pytest
import torch

from kernels.w4a16_format import PackedW4, dequantize, pack_codes, quantize_rtn, unpack_codes


def test_codes_round_trip_through_int32_words() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 24), generator=gen, dtype=torch.int32)
    words = pack_codes(codes)
    assert words.shape == (8, 24) and words.dtype == torch.int32
    assert torch.equal(unpack_codes(words), codes)
    # The GPTQ nibble order: code k of a word sits in bits 4k … 4k+3.
    one = torch.zeros(8, 1, dtype=torch.int32)
    one[3, 0] = 5
    assert int(pack_codes(one)[0, 0]) == 5 << 12
    top = torch.zeros(8, 1, dtype=torch.int32)
    top[7, 0] = 15
    assert torch.equal(unpack_codes(pack_codes(top)), top)  # the sign bit survives


def test_bad_codes_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(12, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_codes(torch.full((8, 4), 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="group size"):
        quantize_rtn(torch.randn(4, 48), group_size=32)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_rtn_error_is_within_half_a_step(symmetric: bool, group_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 256, generator=gen)
    packed = quantize_rtn(w, group_size, symmetric=symmetric)
    assert packed.qweight.shape == (32, 40) and packed.scales.shape == (256 // group_size, 40)
    assert (packed.zeros is None) == symmetric
    err = (dequantize(packed) - w).abs()
    step = packed.scales.index_select(0, torch.arange(256) // group_size).t()
    assert bool((err <= step / 2 + 1e-6).all())
    assert float(err.mean()) > 0  # it really is lossy: the test can fail


def test_act_order_groups_follow_g_idx() -> None:
    gen = torch.Generator().manual_seed(2)
    k, n, g = 64, 16, 32
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    scales = torch.rand(k // g, n, generator=gen) + 0.5
    zeros = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.int32)
    g_idx = torch.randperm(k, generator=gen).to(torch.int32) % (k // g)  # groups scattered over K
    packed = PackedW4(pack_codes(codes), scales, zeros, g, g_idx)
    expected = torch.empty(n, k)
    for row in range(k):
        grp = int(g_idx[row])
        expected[:, row] = (codes[row] - zeros[grp]).float() * scales[grp]
    assert torch.allclose(dequantize(packed), expected)
