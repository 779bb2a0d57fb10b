"""Segmented LoRA in Triton (SGMV style): every adapter of a batch in one shrink and one expand launch.

`DeltaGroups.add_fused` adds, for each adapter segment (an adapter and the rows that use it),
`scaling · (h[rows] Aᵀ) Bᵀ` to the outputs of the projections that read `h`. Looping over adapters
costs a gather, a matmul pair and an `index_add_` per adapter, each a kernel launch of a few rows:
with many adapters in a decode batch, launch overhead dominates. Here the work is two steps whatever
the number of adapters:

- **shrink**: `z[p, :Σr] = x[row_idx[p]] · A_segᵀ` for every packed row position `p`. The rows of
  all segments are packed one segment after another into `row_idx`; a host-built tile table lists
  one entry per (segment, BLOCK_M rows of it, BLOCK_R rank columns of it), so no program is spent
  on an empty tile and a 1-row segment next to a 500-row one costs one tile. Each program reads its
  segment's `Aᵀ` ([in, Σr], contiguous) through a pointer from a per-segment table and masks the rank
  columns past that segment's Σr: adapters of rank 4, 8, 16 and 64 share one launch, the small ones
  padded up to BLOCK_R (16 or 32) in registers only, never in memory. The product accumulates in
  fp32 and `z` is kept in fp32. Small segments (decode) split `in` across programs that add into
  `z` with fp32 atomics, so that a handful of adapters still makes enough programs to keep the
  memory system busy while each program reads a slice of A once.
- **expand**: one launch per projection (q, k and v are separate tensors of different widths, and
  an adapter may target only some of them): each program takes (segment, BLOCK_M rows, BLOCK_N
  output columns), reads that projection's columns of the segment's `z` and its `Bᵀ·scaling`
  ([r, out], from the pointer table; segments without that projection get no tile), and adds the
  product into `out[row_idx[p], cols]` in place. The output is addressed by its strides, so a
  column slice of a wider output (fused q/k/v in one tensor) works as well.

The weights are never copied: the per-step metadata (`pack_segments`) is one small int64 buffer of
row positions, rank offsets, weight pointers and tile tables, sent to the device in one copy. It is
plain data that a caller may cache while the segments and the adapters' weights stay the same.

Limits: the expand adds with a plain load-add-store, so the rows of different segments must be
disjoint and a segment must not repeat a row (as `runtime.block_batching` builds them; the torch
path's `index_add_` has no such limit, and `DeltaGroups` keeps that path for the other cases).
Block dims are >= 16 everywhere (tl.dot's minimum); configurations are fixed per architecture, no
autotune, so the same code runs in the interpreter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kernels.lora_segments import PROJ0, PROJ_W, LoraTileConfig, PackedLora, pack_segments

if TYPE_CHECKING:
    from runtime.lora import FusedLora


@triton.jit
def _shrink_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations itself
    x_ptr,
    z_ptr,
    row_idx_ptr,
    meta_ptr,
    tiles_ptr,
    w_like_ptr,
    K,
    stride_xm,
    stride_xk,
    stride_zm,
    stride_zr,
    META_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
) -> None:
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    seg = tl.load(tiles_ptr + pid_t * 3)
    first = tl.load(tiles_ptr + pid_t * 3 + 1)
    r_start = tl.load(tiles_ptr + pid_t * 3 + 2)
    end = tl.load(meta_ptr + seg * META_W + 1)
    rank = tl.load(meta_ptr + seg * META_W + 2)
    a_ptr = tl.load(meta_ptr + seg * META_W + 3).to(tl.pointer_type(w_like_ptr.dtype.element_ty))
    offs_p = first + tl.arange(0, BLOCK_M)
    mask_p = offs_p < end
    rows = tl.load(row_idx_ptr + offs_p, mask=mask_p, other=0)
    offs_r = r_start + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_p[:, None] & mask_k[None, :],
            other=0.0,
        )
        # Aᵀ is [K, rank], contiguous: its row stride is this segment's rank.
        a = tl.load(
            a_ptr + offs_k[:, None] * rank + offs_r[None, :],
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc += tl.dot(x.to(a.dtype), a, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    z_ptrs = z_ptr + offs_p[:, None] * stride_zm + offs_r[None, :] * stride_zr
    mask = mask_p[:, None] & mask_r[None, :]
    if SPLIT_K == 1:
        tl.store(z_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(z_ptrs, acc, mask=mask)


@triton.jit
def _expand_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations itself
    z_ptr,
    out_ptr,
    row_idx_ptr,
    meta_ptr,
    tiles_ptr,
    w_like_ptr,
    N,
    stride_zm,
    stride_zr,
    stride_om,
    stride_on,
    META_W: tl.constexpr,
    PROJ_COL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
) -> None:
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(tiles_ptr + pid_t * 2)
    first = tl.load(tiles_ptr + pid_t * 2 + 1)
    end = tl.load(meta_ptr + seg * META_W + 1)
    z_col = tl.load(meta_ptr + seg * META_W + PROJ_COL)
    rank = tl.load(meta_ptr + seg * META_W + PROJ_COL + 1)
    b_ptr = tl.load(meta_ptr + seg * META_W + PROJ_COL + 2).to(tl.pointer_type(w_like_ptr.dtype.element_ty))
    offs_p = first + tl.arange(0, BLOCK_M)
    mask_p = offs_p < end
    rows = tl.load(row_idx_ptr + offs_p, mask=mask_p, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r_start in range(0, rank, BLOCK_R):
        offs_r = r_start + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        z = tl.load(
            z_ptr + offs_p[:, None] * stride_zm + (z_col + offs_r)[None, :] * stride_zr,
            mask=mask_p[:, None] & mask_r[None, :],
            other=0.0,
        )
        # Bᵀ·scaling is [rank, N], contiguous.
        b = tl.load(
            b_ptr + offs_r[:, None] * N + offs_n[None, :],
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        # z is rounded to the weights' dtype, as the torch path's z is.
        acc += tl.dot(z.to(b.dtype), b, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_p[:, None] & mask_n[None, :]
    base = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (base.to(tl.float32) + acc).to(base.dtype), mask=mask)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 LoRA weights ask for fp32 results, not TF32 ones; fp16 / bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink(x: torch.Tensor, packed: PackedLora) -> torch.Tensor:
    """z [num_positions, rank_width] fp32: each packed position's row of `x` times its adapter's Aᵀ.

    Columns past a segment's own Σr are left as they are (zero, or unset without split-K).
    """
    cfg = packed.config
    if x.dim() != 2:
        raise ValueError(f"x must be [T, in], got {tuple(x.shape)}")
    w_like = packed.weights[0]
    if x.device != w_like.device:
        raise ValueError(f"x is on {x.device}, the adapters on {w_like.device}")
    alloc = torch.zeros if cfg.split_k > 1 else torch.empty
    z = alloc(packed.num_positions, packed.rank_width, dtype=torch.float32, device=x.device)
    num_tiles = packed.shrink_tiles.shape[0]
    if num_tiles == 0:
        return z
    _shrink_kernel[(num_tiles, cfg.split_k)](
        x,
        z,
        packed.row_idx,
        packed.meta,
        packed.shrink_tiles,
        w_like,
        x.shape[1],
        x.stride(0),
        x.stride(1),
        z.stride(0),
        z.stride(1),
        META_W=packed.meta_width,
        BLOCK_M=cfg.block_m,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        INPUT_PRECISION=_input_precision(w_like.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return z


def lora_expand(z: torch.Tensor, packed: PackedLora, outs: Sequence[torch.Tensor]) -> None:
    """Add each segment's `z[:, cols_j] @ (Bᵀ·scaling)_j` into `outs[j]` at its rows, in place.

    One launch per projection that some segment targets. An output may be any 2-D strided view
    (a column slice of a wider tensor included); it keeps its dtype.
    """
    cfg = packed.config
    w_like = packed.weights[0]
    if len(outs) != len(packed.out_features):
        raise ValueError(f"expected {len(packed.out_features)} outputs, got {len(outs)}")
    for j, (out, tiles) in enumerate(zip(outs, packed.expand_tiles, strict=True)):
        if tiles.shape[0] == 0:
            continue
        n = packed.out_features[j]
        if out.dim() != 2 or out.shape[1] != n or out.device != z.device:
            raise ValueError(f"output {j} must be [T, {n}] on {z.device}, got {tuple(out.shape)}")
        grid = (tiles.shape[0], triton.cdiv(n, cfg.block_n))
        _expand_kernel[grid](
            z,
            out,
            packed.row_idx,
            packed.meta,
            tiles,
            w_like,
            n,
            z.stride(0),
            z.stride(1),
            out.stride(0),
            out.stride(1),
            META_W=packed.meta_width,
            PROJ_COL=PROJ0 + PROJ_W * j,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_R=cfg.block_r,
            INPUT_PRECISION=_input_precision(w_like.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


def lora_add_fused(
    segments: Sequence[tuple[FusedLora | None, torch.Tensor | None]],
    h: torch.Tensor,
    outs: list[torch.Tensor],
    config: LoraTileConfig | None = None,
) -> list[torch.Tensor]:
    """`DeltaGroups.add_fused` in two steps (one shrink, one expand per projection); returns `outs`."""
    packed = pack_segments(segments, len(outs), h.shape[0], h.device, config)
    if packed is not None:
        lora_expand(lora_shrink(h, packed), packed, outs)
    return outs
