"""Paged decode attention in Triton: one query token per row, K/V read in place through a slot table.

`out[b, h] = softmax(q[b, h] · K_bᵀ / √D) · V_b`, where row b's context is the slots
`slots[b, :lengths[b]]` of the caches (optionally only the last `window` of them). Nothing is
gathered or padded up front: each program walks its row's own slots, so a short row costs only its
own length however long the longest row in the batch is (the torch path pads every row of a group
to the group's longest).

Grid `(B, KVH, splits)`. A program owns one row and one KV head and handles all the query heads
of that KV group together: their [G, D] queries form the M side of `tl.dot` against each
[BLOCK_N, D] tile of keys, so K and V are read once per group (GQA without repeating K/V). The
group is padded to 16 rows, with masking, because `tl.dot` needs every block dimension >= 16 on
the GPU; decode is memory-bound, so the padded rows cost compute that was idle anyway. The context
is consumed BLOCK_N keys at a time with an online softmax (a running max and sum per query head,
fp32 accumulators, base-2 exponentials with log2(e) folded into the scale).

Split-K over the context (flash-decoding): when B·KVH programs are too few to occupy the GPU
(small batches with long contexts) each row's visible span is cut into `splits` ranges of whole
BLOCK_N tiles; every program writes its normalised partial output and its log-sum-exp in fp32, and
a second small kernel merges the partials weighted by exp(lse - max). With one split the first
kernel writes the output directly and no scratch is allocated.

Configurations are fixed per architecture family (no autotune, so the same code runs in Triton's
interpreter on the CPU). The GPU numbers are starting points, not yet measured.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.gpu_family import gpu_family
from kernels.paged_attention_reference import check_decode_shapes


class DecodeConfig(NamedTuple):
    """Launch configuration of the decode kernel and its split-K policy."""

    block_n: int  # keys per tile (>= 16: tl.dot's minimum)
    num_warps: int
    num_stages: int
    # Split only while fewer than this many programs per SM would run, and never into ranges
    # shorter than `min_split_tokens`: below that the merge costs more than the parallelism gains.
    programs_per_sm: int
    min_split_tokens: int


MAX_SPLITS = 16
MIN_BLOCK = 16
CONFIGS: dict[str, DecodeConfig] = {
    "sm90": DecodeConfig(block_n=64, num_warps=4, num_stages=2, programs_per_sm=2, min_split_tokens=256),
    "sm80": DecodeConfig(block_n=64, num_warps=4, num_stages=2, programs_per_sm=2, min_split_tokens=256),
    "default": DecodeConfig(block_n=16, num_warps=4, num_stages=1, programs_per_sm=2, min_split_tokens=256),
}


def pick_config(device: torch.device) -> DecodeConfig:
    family = gpu_family(device)
    return CONFIGS[family]


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def pick_num_splits(num_programs: int, span: int, config: DecodeConfig, device: torch.device) -> int:
    """How many ranges to cut each row's span of `span` keys into; 1 off the GPU (nothing to occupy)."""
    if device.type != "cuda":
        return 1
    target = config.programs_per_sm * _sm_count(device.index if device.index is not None else 0)
    if num_programs >= target:
        return 1
    wanted = -(-target // num_programs)
    return max(1, min(wanted, span // config.min_split_tokens, MAX_SPLITS))


@triton.jit
def _paged_decode_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations itself
    q_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    lengths_ptr,
    out_ptr,
    lse_ptr,
    group_size,
    head_dim,
    width,
    window,
    split_tokens,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_sb,
    stride_sl,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    stride_lb,
    stride_lh,
    stride_ls,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + row).to(tl.int32)
    length = tl.minimum(length, width)  # never read past the slot table, whatever lengths says
    start = tl.maximum(length - window, 0)  # window = width when there is none: start 0
    lo = start + split * split_tokens
    hi = tl.minimum(lo + split_tokens, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group_size
    mask_d = offs_d < head_dim
    heads = kv_head * group_size + offs_g
    q = tl.load(
        q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    slot_row = slots_ptr + row.to(tl.int64) * stride_sb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        # 64-bit offsets: slots x stride can pass 2^31 elements in a large cache.
        slot = tl.load(slot_row + offs_n * stride_sl, mask=mask_n, other=0).to(tl.int64)
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_head + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=tl.float32) * qk_scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        # Each tile holds at least one visible key, so m_new is finite and no exp sees -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=tl.float32
        )
        m_i = m_new

    # An empty range (a short row's spare split, or length 0) leaves l_i = 0: write zeros, lse -inf.
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    out_ptrs = (
        out_ptr
        + row * stride_ob
        + heads[:, None] * stride_oh
        + split * stride_os
        + offs_d[None, :] * stride_od
    )
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    if SPLIT:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=mask_g)


@triton.jit
def _merge_splits_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations itself
    part_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    head_dim,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_pd,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_ob,
    stride_oh,
    stride_od,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    row = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < head_dim
    lse = tl.load(
        lse_ptr + row * stride_lb + head * stride_lh + offs_s * stride_ls, mask=mask_s, other=float("-inf")
    )
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: all weights become 0
    weight = tl.exp2(lse - top)
    total = tl.sum(weight, axis=0)
    part = tl.load(
        part_ptr
        + row * stride_pb
        + head * stride_ph
        + offs_s[:, None] * stride_ps
        + offs_d[None, :] * stride_pd,
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + row * stride_ob + head * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


def _block(n: int) -> int:
    return max(MIN_BLOCK, int(triton.next_power_of_2(n)))


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    window: int | None = None,
    *,
    config: DecodeConfig | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, H, D] over each row's paged context; returns [B, H, D] in q's dtype.

    key_cache, value_cache: [num_slots, KVH, D], any strides (the head-major `LayerKV` views are
    read in place); H must be a multiple of KVH. slots [B, L] (int32 or int64): the cache slot of
    each context position, padded past a row's length with anything. lengths [B]: true lengths.
    window: key j is visible iff j > length - 1 - window. The scale is 1/√D. `num_splits` forces
    the split-K factor (tests); by default it is picked from the batch size and the GPU's SM count.
    """
    check_decode_shapes(q, key_cache, value_cache, slots, lengths)
    for name, t in {
        "key_cache": key_cache,
        "value_cache": value_cache,
        "slots": slots,
        "lengths": lengths,
    }.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    b, heads, dim = q.shape
    kv_heads = key_cache.shape[1]
    group = heads // kv_heads
    width = slots.shape[1]
    out = torch.empty(b, heads, dim, dtype=q.dtype, device=q.device)
    if b == 0 or heads == 0:
        return out
    cfg = config or pick_config(q.device)
    # The longest visible span any row can have: the split ranges are cut from it.
    span = max(1, width if window is None else min(width, window))
    splits = num_splits or pick_num_splits(b * kv_heads, span, cfg, q.device)
    split_tokens = triton.cdiv(triton.cdiv(span, splits), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(span, split_tokens)  # no split left with nothing to do in every row
    if splits > 1:
        part = torch.empty(b, heads, splits, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
        target, part_strides, lse_strides = part, part.stride(), lse.stride()
    else:
        lse = out  # not written when unsplit
        target, part_strides, lse_strides = out, (*out.stride()[:2], 0, out.stride(2)), (0, 0, 0)
    block_d = _block(dim)
    _paged_decode_kernel[(b, kv_heads, splits)](
        q,
        key_cache,
        value_cache,
        slots,
        lengths,
        target,
        lse,
        group,
        dim,
        width,
        width if window is None else window,
        split_tokens,
        math.log2(math.e) / math.sqrt(dim),
        *q.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        *slots.stride(),
        *part_strides,
        *lse_strides,
        SPLIT=splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_G=_block(group),
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(b, heads)](
            part,
            lse,
            out,
            splits,
            dim,
            *part.stride(),
            *lse.stride(),
            *out.stride(),
            BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=block_d,
            num_warps=1 if block_d <= 64 else 2,
        )
    return out
