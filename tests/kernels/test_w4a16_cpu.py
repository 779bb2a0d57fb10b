"""The CPU int4 path against the fp32 dequantize-then-matmul reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kernels.w4a16_cpu import CpuInt4Linear
from kernels.w4a16_format import PackedW4, dequantize, pack_codes, quantize_rtn, unpack_codes
from kernels.w4a16_gguf import packed_from_gguf_q4

Q4_1 = GGMLQuantizationType.Q4_1


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


def with_offsets(packed: PackedW4, seed: int) -> PackedW4:
    """The same codes with a per-group fp16 offset as large as the weights themselves (as Q4_1's)."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(packed.scales.float().abs().mean()) * 8
    offsets = (torch.randn(packed.scales.shape, generator=gen) * scale).to(torch.float16)
    return packed._replace(offsets=offsets)


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("offset", [False, True])
def test_int4_matmul_matches_the_reference(m: int, group_size: int, ordered: bool, offset: bool) -> None:
    gen = torch.Generator().manual_seed(m * 7 + group_size)
    w = torch.randn(48, 256, generator=gen)
    packed = quantize_rtn(w, group_size)
    if ordered:
        packed = act_order(packed, seed=m)
        assert packed.g_idx is not None
    if offset:
        packed = with_offsets(packed, seed=m)
    layer = CpuInt4Linear(packed)
    assert layer.fast
    x = torch.randn(m, 256, generator=gen)
    ref = x @ dequantize(packed).t()
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (m, 48)
    # Activations go through bf16 (8 bits of mantissa): compare relative to the output's scale.
    assert float((out - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_gguf_blocks_match_the_gguf_reader(qtype: GGMLQuantizationType) -> None:
    # Q4_1: symmetric-looking codes with zero points 0 and offsets; Q4_0: no zero points at all.
    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((48, 128)) * 0.05 + 0.1).astype(np.float32)
    raw = gguf_quantize(w, qtype)
    packed = packed_from_gguf_q4(raw, qtype, (48, 128))
    layer = CpuInt4Linear(packed)
    assert layer.fast
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(8))
    ref = x @ torch.from_numpy(gguf_dequantize(raw, qtype)).t()
    assert float((layer(x) - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


def test_output_counts_tinygemm_refuses_fall_back() -> None:
    # The int4pack kernel takes N in multiples of 16 only; 40 outputs run dense, exactly.
    raw = gguf_quantize(np.random.default_rng(9).standard_normal((40, 64)).astype(np.float32), Q4_1)
    packed = packed_from_gguf_q4(raw, Q4_1, (40, 64))
    layer = CpuInt4Linear(packed)
    assert not layer.fast
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(layer(x), x @ torch.from_numpy(gguf_dequantize(raw, Q4_1)).t(), atol=1e-5)


@pytest.mark.parametrize("offset", [False, True])
def test_unsupported_group_size_falls_back_exactly(offset: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 96, generator=gen)
    packed = quantize_rtn(w, group_size=16)
    if offset:
        packed = with_offsets(packed, seed=3)
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
