"""The canonical 4-bit layout: packing round trips, RTN quantization error, act-order groups."""

from __future__ import annotations

import pytest
import torch

from kernels.w4a16_format import PackedW4, concat_packed, dequantize, pack_codes, quantize_rtn, unpack_codes


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


def test_offsets_are_added_after_scaling_per_group() -> None:
    gen = torch.Generator().manual_seed(3)
    k, n, g = 64, 8, 32
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // g, n, generator=gen) + 0.5).half()
    zeros = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.int32)
    offsets = torch.randn(k // g, n, generator=gen).half()
    packed = PackedW4(pack_codes(codes), scales, zeros, g, None, offsets)
    expected = torch.empty(n, k)
    for row in range(k):
        grp = row // g
        expected[:, row] = (codes[row] - zeros[grp]).float() * scales[grp].float() + offsets[grp].float()
    assert torch.equal(dequantize(packed), expected)
    assert packed.nbytes == packed._replace(offsets=None).nbytes + offsets.nbytes


def test_concat_packed_keeps_every_part_exact() -> None:
    gen = torch.Generator().manual_seed(4)
    asym = quantize_rtn(torch.randn(16, 64, generator=gen), 32)
    sym = quantize_rtn(torch.randn(8, 64, generator=gen), 32, symmetric=True)
    offset = asym._replace(offsets=torch.randn(2, 16, generator=gen))
    fused = concat_packed([offset, sym, asym])
    assert fused.out_features == 40 and fused.zeros is not None and fused.offsets is not None
    expected = torch.cat([dequantize(offset), dequantize(sym), dequantize(asym)])
    assert torch.equal(dequantize(fused), expected)
    assert concat_packed([sym, sym]).zeros is None and concat_packed([sym, asym]).offsets is None
    with pytest.raises(ValueError, match="groups of 32"):
        concat_packed([sym, quantize_rtn(torch.randn(8, 64, generator=gen), 64)])
    scattered = sym._replace(g_idx=torch.arange(64, dtype=torch.int32) % 2)
    with pytest.raises(ValueError, match="grouped differently"):
        concat_packed([sym, scattered])


def test_moving_keeps_every_tensor() -> None:
    packed = quantize_rtn(torch.randn(8, 64), 32)._replace(offsets=torch.ones(2, 8))
    moved = packed.to("meta")
    assert all(
        t.device.type == "meta"
        for t in (moved.qweight, moved.scales, moved.zeros, moved.offsets)
        if t is not None
    )
    assert moved.group_size == 32 and moved.g_idx is None
