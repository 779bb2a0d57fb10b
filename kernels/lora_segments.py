"""Segmented LoRA's launch metadata: which rows each adapter owns, its rank, its weights, the tiles.

`pack_segments` turns the adapter segments of one `DeltaGroups.add_fused` into one small int64 buffer
of row positions, rank offsets, weight pointers and tile tables (see `kernels.lora_triton`, whose
kernels read it). It is plain data: a caller may cache it while the segments and weights stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from kernels.gpu_family import gpu_family

if TYPE_CHECKING:
    from runtime.lora import FusedLora


class LoraTileConfig(NamedTuple):
    """One bucket's launch configuration (shared by shrink and expand so they share the row tiles)."""

    block_m: int  # packed rows per tile
    block_n: int  # expand: output columns per program
    block_k: int  # shrink: input features per step of the reduction
    block_r: int  # rank columns per shrink program, and per step of the expand's reduction
    split_k: int  # shrink: programs sharing one tile's reduction over `in` (atomics when > 1)
    num_warps: int
    num_stages: int


# Up to this many rows in the longest segment, the decode bucket is used.
SMALL_SEGMENT = 16
CONFIGS: dict[str, tuple[LoraTileConfig, LoraTileConfig]] = {
    # (decode, prefill) per architecture family. Not yet measured on a GPU: chosen so that a decode
    # shrink with a few adapters still launches dozens of programs (split-K) and a prefill tile
    # reuses each weight tile over 64 rows.
    "sm90": (LoraTileConfig(16, 128, 256, 32, 8, 4, 2), LoraTileConfig(64, 128, 64, 32, 1, 4, 3)),
    "sm80": (LoraTileConfig(16, 128, 128, 32, 8, 4, 2), LoraTileConfig(64, 64, 64, 32, 1, 4, 3)),
    # The interpreter (and anything else): small tiles keep the masked padding cheap.
    "default": (LoraTileConfig(16, 32, 32, 16, 2, 4, 1), LoraTileConfig(32, 32, 32, 16, 1, 4, 1)),
}


def pick_config(longest_segment: int, device: torch.device) -> LoraTileConfig:
    family = gpu_family(device)
    small, large = CONFIGS[family]
    return small if longest_segment <= SMALL_SEGMENT else large


# Per-segment metadata row: where its rows are in `row_idx`, its Σr and Aᵀ, then per projection
# the first column of its slice of z, its rank (0 when the adapter does not target it) and Bᵀ.
ROW_START, ROW_END, A_RANK, A_PTR, PROJ0 = 0, 1, 2, 3, 4
PROJ_W = 3


class PackedLora(NamedTuple):
    """The launch metadata of one `add_fused` over a set of segments (see `pack_segments`)."""

    config: LoraTileConfig
    num_positions: int  # rows of z: every segment's rows, packed one segment after another
    rank_width: int  # columns of z: the largest Σr
    meta_width: int
    meta: torch.Tensor  # [S, meta_width] int64
    row_idx: torch.Tensor  # [num_positions] int64: the row of h (and of the outputs) at each position
    shrink_tiles: torch.Tensor  # [Ts, 3] int64: (segment, first position, first rank column)
    expand_tiles: list[torch.Tensor]  # per projection, [Tj, 2] int64: (segment, first position)
    out_features: list[int]  # per projection, its Bᵀ width (0 when no segment targets it)
    positions: list[tuple[int, int, int]]  # (index into the segments given, first, end position)
    weights: tuple[torch.Tensor, ...]  # keeps every pointed-to weight alive as long as the metadata


def pack_segments(
    segments: Sequence[tuple[FusedLora | None, torch.Tensor | None]],
    num_projections: int,
    num_rows: int,
    device: torch.device,
    config: LoraTileConfig | None = None,
) -> PackedLora | None:
    """The metadata for `lora_shrink` / `lora_expand` over `segments` (None when nothing is adapted).

    `segments` are (adapter fused for the projections asked for, its rows or None for all
    `num_rows` rows); segments whose adapter targets none of the projections, or with no rows, are
    left out. Every weight must live on `device` and share one dtype.
    """
    kept: list[tuple[int, FusedLora, torch.Tensor | None, int]] = []
    for i, (fused, rows) in enumerate(segments):
        n = num_rows if rows is None else int(rows.numel())
        if fused is not None and n > 0:
            kept.append((i, fused, rows, n))
    if not kept:
        return None
    cfg = config or pick_config(max(n for *_, n in kept), device)
    dtype = kept[0][1].a_t.dtype
    weights: list[torch.Tensor] = []
    meta: list[int] = []
    shrink_tiles: list[int] = []
    expand_tiles: list[list[int]] = [[] for _ in range(num_projections)]
    out_features = [0] * num_projections
    positions: list[tuple[int, int, int]] = []
    start = rank_width = 0
    for s, (i, fused, _rows, n) in enumerate(kept):
        a_t = fused.a_t
        _check_weight(a_t, dtype, device)
        a_rank = int(a_t.shape[1])
        rank_width = max(rank_width, a_rank)
        row = [start, start + n, a_rank, a_t.data_ptr()] + [0] * (PROJ_W * num_projections)
        weights.append(a_t)
        for j, cols, b_t in fused.parts:
            _check_weight(b_t, dtype, device)
            if out_features[j] not in (0, b_t.shape[1]):
                raise ValueError(f"projection {j}: adapters disagree on its width")
            out_features[j] = int(b_t.shape[1])
            row[PROJ0 + PROJ_W * j : PROJ0 + PROJ_W * (j + 1)] = [
                int(cols.start),
                int(cols.stop - cols.start),
                b_t.data_ptr(),
            ]
            weights.append(b_t)
        meta += row
        for p in range(start, start + n, cfg.block_m):
            for r in range(0, a_rank, cfg.block_r):
                shrink_tiles += [s, p, r]
            for j, _, _ in fused.parts:
                expand_tiles[j] += [s, p]
        positions.append((i, start, start + n))
        start += n
    meta_width = PROJ0 + PROJ_W * num_projections
    # One host buffer, one copy: the metadata and tile tables, then the rows when they are on the host.
    ints = meta + shrink_tiles + [v for tiles in expand_tiles for v in tiles]
    host = torch.tensor(ints, dtype=torch.int64)
    row_parts = [torch.arange(num_rows) if rows is None else rows.long() for _, _, rows, _ in kept]
    rows_on_host = all(r.device.type == "cpu" for r in row_parts)
    if rows_on_host:
        host = torch.cat([host, *row_parts])
    if device.type == "cuda":
        host = host.pin_memory()
    buf = host.to(device, non_blocking=True)
    row_idx = buf[len(ints) :] if rows_on_host else torch.cat([r.to(device) for r in row_parts])
    offset = len(meta)
    meta_t = buf[:offset].view(len(kept), meta_width)
    shrink_t = buf[offset : offset + len(shrink_tiles)].view(-1, 3)
    offset += len(shrink_tiles)
    expand_t = []
    for tiles in expand_tiles:
        expand_t.append(buf[offset : offset + len(tiles)].view(-1, 2))
        offset += len(tiles)
    return PackedLora(
        cfg,
        start,
        rank_width,
        meta_width,
        meta_t,
        row_idx,
        shrink_t,
        expand_t,
        out_features,
        positions,
        tuple(weights),
    )


def _check_weight(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    # The kernels address weights by raw pointer with their contiguous strides.
    if t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"LoRA weights must be contiguous {dtype} on {device}, got {t.dtype} on {t.device}")
