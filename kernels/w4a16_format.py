"""The one packed layout of 4-bit weights (W4A16) that every importer, kernel and the zoo share.

A linear layer `y = x Wᵀ` with W of shape [N, K] (N outputs, K inputs) is stored as:

- `qweight`: int32 [K/8, N]. Eight 4-bit codes along K per word, code k % 8 in bits 4·(k % 8) …
  4·(k % 8) + 3 (lowest nibble first): the GPTQ layout, so GPTQ checkpoints need no repacking.
- `scales`: [K/g, N] floating point, one per group of g consecutive inputs (per output).
- `zeros`: [K/g, N] int32 codes 0 … 15, or None for symmetric quantization (zero point 8).
- `g_idx`: optional int32 [K]: the group of each input row, for act-order (GPTQ `desc_act`)
  checkpoints whose groups are not contiguous; None means `k // g`.

The weight is `W[n, k] = (code[k, n] - zero[group(k), n]) · scale[group(k), n]`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BITS = 4
PER_WORD = 32 // BITS
MAX_CODE = (1 << BITS) - 1
SYMMETRIC_ZERO = 1 << (BITS - 1)


class PackedW4(NamedTuple):
    """4-bit weights of one [N, K] linear in the canonical layout (see the module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    g_idx: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[0]) * PER_WORD

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[1])

    def groups(self) -> torch.Tensor:
        """The group of each input row, [K]."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features) // self.group_size

    def zero_points(self) -> torch.Tensor:
        """Integer zero points [K/g, N] (8 everywhere when symmetric)."""
        if self.zeros is not None:
            return self.zeros
        return torch.full(self.scales.shape, SYMMETRIC_ZERO, dtype=torch.int32)

    @property
    def nbytes(self) -> int:
        extra = [t for t in (self.zeros, self.g_idx) if t is not None]
        return self.qweight.nbytes + self.scales.nbytes + sum(t.nbytes for t in extra)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int codes [K, N] in 0 … 15 → int32 [K/8, N], lowest nibble first."""
    k, n = codes.shape
    if k % PER_WORD:
        raise ValueError(f"K = {k} is not a multiple of {PER_WORD}")
    if int(codes.min()) < 0 or int(codes.max()) > MAX_CODE:
        raise ValueError("4-bit codes must be in [0, 15]")
    c = codes.to(torch.int32).reshape(k // PER_WORD, PER_WORD, n)
    word = torch.zeros(k // PER_WORD, n, dtype=torch.int32)
    for i in range(PER_WORD):
        # int32 shifts wrap the top nibble into the sign bit, which is what the layout wants.
        word |= c[:, i, :] << (BITS * i)
    return word


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N] → int32 codes [K, N]."""
    words, n = qweight.shape
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
    codes = (qweight[:, None, :] >> shifts[None, :, None]) & MAX_CODE
    return codes.reshape(words * PER_WORD, n)


def dequantize(packed: PackedW4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [N, K] the packed form stands for (the reference every path is checked against)."""
    codes = unpack_codes(packed.qweight)  # [K, N]
    groups = packed.groups()
    zeros = packed.zero_points().index_select(0, groups)  # [K, N]
    scales = packed.scales.float().index_select(0, groups)
    return ((codes - zeros).float() * scales).t().contiguous().to(dtype)


def quantize_rtn(weight: torch.Tensor, group_size: int, symmetric: bool = False) -> PackedW4:
    """Round-to-nearest 4-bit quantization of W [N, K] with groups of `group_size` inputs.

    Asymmetric: each group's [min, max] maps onto codes 0 … 15 with an integer zero point.
    Symmetric: the zero point is 8 and the scale is max|w| / 7 (codes 1 … 15).
    """
    n, k = weight.shape
    if k % group_size or group_size % PER_WORD:
        raise ValueError(f"K = {k} must be a multiple of the group size {group_size}, itself of {PER_WORD}")
    w = weight.float().t().reshape(k // group_size, group_size, n)  # [groups, g, N]
    if symmetric:
        scale = w.abs().amax(dim=1) / (SYMMETRIC_ZERO - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, SYMMETRIC_ZERO)
    else:
        lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / MAX_CODE
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, MAX_CODE)
    codes = torch.round(w / scale[:, None, :] + zero[:, None, :]).clamp(0, MAX_CODE)
    return PackedW4(
        qweight=pack_codes(codes.reshape(k, n).to(torch.int32)),
        scales=scale.to(weight.dtype if weight.is_floating_point() else torch.float32),
        zeros=None if symmetric else zero.to(torch.int32),
        group_size=group_size,
    )
