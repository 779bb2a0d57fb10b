"""Importing 4-bit checkpoints into the canonical layout (kernels.w4a16_format): GPTQ and AWQ.

GPTQ (AutoGPTQ / GPTQModel, per linear layer):
- `qweight` int32 [K/8, N], codes packed along K, lowest nibble first: already our layout.
- `qzeros` int32 [K/g, N/8], zero points packed along N, lowest nibble first. Format v1 (the
  original) stores `zero - 1`, so a symmetric checkpoint holds 7 for a zero point of 8; v2 stores
  the zero point itself.
- `scales` [K/g, N]; `g_idx` int32 [K], the group of each input row (act-order / `desc_act`
  checkpoints have it scattered; others have `k // g`).

AWQ, GEMM layout:
- `qweight` int32 [K, N/8] and `qzeros` int32 [K/g, N/8], both packed along N, eight codes per
  word in AWQ's interleaved order: word nibble i holds column `AWQ_ORDER[i]` of its eight.
- `scales` [K/g, N]; zero points are stored as they are (no offset).
"""

from __future__ import annotations

import torch

from kernels.w4a16_format import BITS, MAX_CODE, PER_WORD, PackedW4, pack_codes

# AWQ packs columns 0, 2, 4, 6, 1, 3, 5, 7 of each group of eight into nibbles 0 … 7.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class QuantizedImportError(ValueError):
    """A quantized checkpoint's tensors do not fit together."""


def _unpack_along_columns(
    words: torch.Tensor, order: tuple[int, ...] = tuple(range(PER_WORD))
) -> torch.Tensor:
    """int32 [R, C/8] → codes [R, C]; nibble i of a word is column `order[i]` of its eight."""
    rows, cols = words.shape
    out = torch.empty(rows, cols, PER_WORD, dtype=torch.int32)
    for nibble, column in enumerate(order):
        out[:, :, column] = (words >> (BITS * nibble)) & MAX_CODE
    return out.reshape(rows, cols * PER_WORD)


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    version: int = 1,
    symmetric: bool = False,
) -> PackedW4:
    """A GPTQ layer in the canonical layout; `version` is the zero-point format (1 or 2)."""
    if version not in (1, 2):
        raise QuantizedImportError(f"GPTQ zero-point format must be 1 or 2, got {version}")
    k, n = qweight.shape[0] * PER_WORD, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != n or qzeros.shape != (groups, n // PER_WORD):
        raise QuantizedImportError(
            f"GPTQ shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)},"
            f" scales {tuple(scales.shape)}"
        )
    if g_idx is not None and (g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise QuantizedImportError(f"g_idx must hold {k} group ids in [0, {groups})")
    if g_idx is None and groups * group_size != k:
        raise QuantizedImportError(f"{groups} groups of {group_size} do not cover K = {k}")
    zeros = _unpack_along_columns(qzeros.to(torch.int32))
    if version == 1:
        zeros = zeros + 1  # v1 stores zero - 1 (and wraps 16 to 0 in packing)
        zeros = torch.where(zeros > MAX_CODE, zeros - (MAX_CODE + 1), zeros)
    sequential = g_idx is None or torch.equal(g_idx.long(), torch.arange(k) // group_size)
    return PackedW4(
        qweight=qweight.to(torch.int32),
        scales=scales,
        zeros=None if symmetric else zeros,
        group_size=group_size,
        g_idx=None if g_idx is None or sequential else g_idx.to(torch.int32),
    )


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> PackedW4:
    """An AWQ GEMM-layout layer in the canonical layout (its codes repacked along K)."""
    k, n = qweight.shape[0], qweight.shape[1] * PER_WORD
    if scales.shape != (k // group_size, n) or qzeros.shape != (k // group_size, n // PER_WORD):
        raise QuantizedImportError(
            f"AWQ shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)},"
            f" scales {tuple(scales.shape)} for group size {group_size}"
        )
    codes = _unpack_along_columns(qweight.to(torch.int32), AWQ_ORDER)  # [K, N]
    zeros = _unpack_along_columns(qzeros.to(torch.int32), AWQ_ORDER)
    return PackedW4(pack_codes(codes), scales, zeros, group_size)
