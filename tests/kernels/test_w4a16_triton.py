"""The Triton W4A16 kernel against the fp32 dequantize-then-matmul reference (interpreter on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from kernels.w4a16_format import PackedW4, dequantize, quantize_rtn
from kernels.w4a16_gguf import packed_from_gguf_q4
from kernels.w4a16_triton import CONFIGS, TileConfig, pick_config, w4a16_matmul
from tests.kernels.test_w4a16_cpu import act_order, with_offsets

K, N = 256, 64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check(x: torch.Tensor, packed: PackedW4, config: TileConfig | None = None) -> None:
    out = w4a16_matmul(x, packed, config)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], packed.out_features)
    # The reference sees the same (rounded) activations, in fp32.
    ref = x.float().cpu() @ dequantize(packed).t()
    tol = 1e-4 if x.dtype == torch.float32 else 1e-2
    assert float((out.float().cpu() - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("ordered", [False, True])
def test_matches_the_reference(dtype: torch.dtype, m: int, group_size: int, ordered: bool) -> None:
    gen = torch.Generator().manual_seed(m + group_size)
    packed = quantize_rtn(torch.randn(N, K, generator=gen) * 0.05, group_size)
    if ordered:
        packed = act_order(packed, seed=m)
    x = torch.randn(m, K, generator=gen).to(dtype)
    check(x, packed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [3, 33])  # the split-K bucket and the tiled one
@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_gguf_blocks_match_the_reference(dtype: torch.dtype, m: int, qtype: GGMLQuantizationType) -> None:
    # Q4_1: zero points 0 plus fp16 offsets; Q4_0: symmetric, no offsets. Rows shifted off zero
    # so that a kernel ignoring the offsets is far off.
    rng = np.random.default_rng(m)
    w = (rng.standard_normal((N, K)) * 0.05 + rng.standard_normal((N, 1)) * 0.2).astype(np.float32)
    packed = packed_from_gguf_q4(gguf_quantize(w, qtype), qtype, (N, K))
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(dtype)
    check(x, packed)


@pytest.mark.parametrize("m", [3, 33])
def test_offsets_with_act_order_and_fp32_scales(m: int) -> None:
    gen = torch.Generator().manual_seed(m + 11)
    packed = with_offsets(act_order(quantize_rtn(torch.randn(N, K, generator=gen) * 0.05, 32), seed=m), m)
    packed = packed._replace(offsets=packed.offsets.float() if packed.offsets is not None else None)
    check(torch.randn(m, K, generator=gen).half(), packed)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_configuration_is_correct(family: str) -> None:
    # The GPU tables too (their block sizes, split-K and stage counts), at both buckets.
    gen = torch.Generator().manual_seed(5)
    packed = quantize_rtn(torch.randn(N, K, generator=gen) * 0.05, 32, symmetric=True)
    for config, m in zip(CONFIGS[family], (5, 40), strict=True):
        assert config.block_m >= 16 and config.block_n >= 16 and config.block_k >= 16
        check(torch.randn(m, K, generator=gen), packed, config)
        check(torch.randn(m, K, generator=gen), with_offsets(packed, seed=m), config)


def test_buckets_by_m() -> None:
    cpu = torch.device("cpu")
    assert pick_config(1, cpu).split_k > 1 and pick_config(16, cpu).split_k > 1
    assert pick_config(17, cpu).split_k == 1


def test_bad_shapes_are_refused() -> None:
    packed = quantize_rtn(torch.randn(N, K), 32)
    with pytest.raises(ValueError, match=r"\[M, 256\]"):
        w4a16_matmul(torch.randn(2, K + 8), packed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_the_gpu() -> None:
    gen = torch.Generator().manual_seed(6)
    packed = quantize_rtn(torch.randn(N, K, generator=gen) * 0.05, 128)
    for p in (packed, with_offsets(packed, seed=6)):
        on_gpu = p.to("cuda")
        for m in (8, 40):
            check(torch.randn(m, K, generator=gen).to(torch.bfloat16).cuda(), on_gpu)
