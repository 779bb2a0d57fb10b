"""A Marlin-style W4A16 GEMM in Triton: 4-bit weights in the canonical layout, fp16/bf16 activations.

`y[M, N] = x[M, K] · Wᵀ` with W in `kernels.w4a16_format` layout. Each program computes a
[BLOCK_M, BLOCK_N] tile of y over its share of K: it loads the int32 words holding a [BLOCK_K,
BLOCK_N] tile of codes (eight codes per word, along K), shifts and masks out the codes, and turns
them into floats with a bit trick instead of a per-element int-to-float conversion: OR-ing a code
into the mantissa of 2²³ (0x4B000000) and reinterpreting the bits gives the float 2²³ + code, so
subtracting 2²³ + zero yields `code - zero` exactly. The group scale is applied to that tile, then
the group offset where the layout has one (HAS_OFFSETS is a compile-time flag, so layouts without
offsets run the same code as before), and the product accumulates in fp32 through `tl.dot`. The
reference is `kernels.w4a16_format.dequantize` followed by an fp32 matmul.

The strategy is bucketed by M, with fixed configurations (no autotune, so the same code runs in
the interpreter): small M (decode) splits K across programs, which add their partial tiles into an
fp32 output with atomics, so that enough programs run to keep the memory system busy while each
reads its weights once; larger M runs a tiled, pipelined GEMM with the whole K per program.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.gpu_family import gpu_family
from kernels.w4a16_format import PackedW4


class TileConfig(NamedTuple):
    """One M bucket's launch configuration."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


# Up to this many rows the GEMV / split-K bucket is used. Block dims stay >= 16 (tl.dot's minimum).
SMALL_M = 16
CONFIGS: dict[str, tuple[TileConfig, TileConfig]] = {
    # (small M, large M) per architecture family; measured on the GPU in benchmarks/w4a16.py.
    "sm90": (TileConfig(16, 64, 128, 4, 4, 3), TileConfig(64, 128, 64, 1, 8, 4)),
    "sm80": (TileConfig(16, 64, 128, 4, 4, 3), TileConfig(64, 128, 32, 1, 4, 4)),
    "default": (TileConfig(16, 32, 32, 2, 4, 2), TileConfig(32, 32, 32, 1, 4, 2)),
}


def pick_config(m: int, device: torch.device) -> TileConfig:
    family = gpu_family(device)
    small, large = CONFIGS[family]
    return small if m <= SMALL_M else large


@triton.jit
def _w4a16_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations itself
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    offsets_ptr,
    out_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_og,
    stride_on_off,
    stride_om,
    stride_on,
    HAS_ZEROS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
) -> None:
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        words = tl.load(
            qweight_ptr + (offs_k[:, None] // 8) * stride_qk + offs_n[None, :] * stride_qn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0,
        )
        codes = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF
        groups = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0) if HAS_G_IDX else offs_k // group_size
        scale = tl.load(
            scales_ptr + groups[:, None] * stride_sg + offs_n[None, :] * stride_sn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(
                zeros_ptr + groups[:, None] * stride_zg + offs_n[None, :] * stride_zn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0,
            ).to(tl.float32)
        else:
            zero = 8.0
        # The bit trick: 0x4B000000 | code is the float 2^23 + code.
        magic = (codes | 0x4B000000).to(tl.float32, bitcast=True)
        w = (magic - (8388608.0 + zero)) * scale
        if HAS_OFFSETS:
            w += tl.load(
                offsets_ptr + groups[:, None] * stride_og + offs_n[None, :] * stride_on_off,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            ).to(tl.float32)
        acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask)


def w4a16_matmul(x: torch.Tensor, packed: PackedW4, config: TileConfig | None = None) -> torch.Tensor:
    """`x @ Wᵀ` for x [M, K] (fp16, bf16 or fp32) and 4-bit W [N, K]; returns x's dtype."""
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"x must be [M, {packed.in_features}], got {tuple(x.shape)}")
    m, k = x.shape
    n = packed.out_features
    cfg = config or pick_config(m, x.device)
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    zeros = packed.zeros if packed.zeros is not None else packed.scales  # unused when HAS_ZEROS is off
    g_idx = packed.g_idx if packed.g_idx is not None else packed.qweight  # unused when HAS_G_IDX is off
    offsets = packed.offsets if packed.offsets is not None else packed.scales  # unused unless HAS_OFFSETS
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    _w4a16_kernel[grid](
        x,
        packed.qweight,
        packed.scales,
        zeros,
        g_idx,
        offsets,
        out,
        m,
        n,
        k,
        packed.group_size,
        x.stride(0),
        x.stride(1),
        packed.qweight.stride(0),
        packed.qweight.stride(1),
        packed.scales.stride(0),
        packed.scales.stride(1),
        zeros.stride(0),
        zeros.stride(1),
        offsets.stride(0),
        offsets.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_ZEROS=packed.zeros is not None,
        HAS_G_IDX=packed.g_idx is not None,
        HAS_OFFSETS=packed.offsets is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out.to(x.dtype)
