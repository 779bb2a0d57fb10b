"""The one packed layout of 4-bit weights (W4A16) that every importer, kernel and the zoo share.

A linear layer `y = x Wᵀ` with W of shape [N, K] (N outputs, K inputs) is stored as:

- `qweight`: int32 [K/8, N]. Eight 4-bit codes along K per word, code k % 8 in bits 4·(k % 8) …
  4·(k % 8) + 3 (lowest nibble first): the GPTQ layout, so GPTQ checkpoints need no repacking.
- `scales`: [K/g, N] floating point, one per group of g consecutive inputs (per output).
- `zeros`: [K/g, N] int32 codes 0 … 15, or None for symmetric quantization (zero point 8).
- `g_idx`: optional int32 [K]: the group of each input row, for act-order (GPTQ `desc_act`)
  checkpoints whose groups are not contiguous; None means `k // g`.
- `offsets`: optional [K/g, N] floating point, added to each group after scaling; None means 0.
  GGUF's Q4_1 stores a per-group minimum `m` (`w = d · q + m`) that no integer zero point can
  express, so it is kept here (with zero points 0) and imports without loss.

The weight is `W[n, k] = (code[k, n] - zero[group(k), n]) · scale[group(k), n] + offset[group(k), n]`,
computed in fp32 in exactly that order (see `dequantize`), which makes it bit for bit equal to
llama.cpp's own dequantization of Q4_0 and Q4_1.
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
    offsets: torch.Tensor | None = None

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
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def zero_points(self) -> torch.Tensor:
        """Integer zero points [K/g, N] (8 everywhere when symmetric)."""
        if self.zeros is not None:
            return self.zeros
        return torch.full(self.scales.shape, SYMMETRIC_ZERO, dtype=torch.int32, device=self.scales.device)

    def to(self, device: torch.device | str) -> PackedW4:
        """The same weights with every tensor on `device`."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PackedW4(
            self.qweight.to(device),
            self.scales.to(device),
            move(self.zeros),
            self.group_size,
            move(self.g_idx),
            move(self.offsets),
        )

    @property
    def nbytes(self) -> int:
        extra = [t for t in (self.zeros, self.g_idx, self.offsets) if t is not None]
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
    weight = (codes - zeros).float() * scales
    if packed.offsets is not None:
        # A separate add after the product (no fused multiply-add): llama.cpp's `d * q + m` order.
        weight = weight + packed.offsets.float().index_select(0, groups)
    return weight.t().contiguous().to(dtype)


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


def concat_packed(parts: list[PackedW4]) -> PackedW4:
    """Several linears over the same inputs as one, their outputs side by side (along N).

    This is how q/k/v or gate/up projections fuse into one matmul. The parts must share the group
    size and the input grouping (`g_idx`); where only some store zero points or offsets, the others'
    defaults (8, 0) are written out so that every part keeps its weights exactly.
    """
    if not parts:
        raise ValueError("concat_packed needs at least one part")
    first = parts[0]
    for p in parts[1:]:
        if p.group_size != first.group_size or p.in_features != first.in_features:
            raise ValueError(
                f"cannot concatenate 4-bit linears of {p.in_features} inputs in groups of {p.group_size}"
                f" with {first.in_features} inputs in groups of {first.group_size}"
            )
        same_groups = (p.g_idx is None and first.g_idx is None) or (
            p.g_idx is not None and first.g_idx is not None and torch.equal(p.g_idx, first.g_idx)
        )
        if not same_groups:
            raise ValueError("cannot concatenate 4-bit linears whose inputs are grouped differently (g_idx)")
        if p.scales.dtype != first.scales.dtype:
            raise ValueError(f"cannot concatenate scales of {p.scales.dtype} and {first.scales.dtype}")
    zeros = None
    if any(p.zeros is not None for p in parts):
        zeros = torch.cat([p.zero_points().to(p.scales.device) for p in parts], dim=1)
    offsets = None
    with_offsets = [p.offsets for p in parts if p.offsets is not None]
    if with_offsets:
        dtype = with_offsets[0].dtype
        offsets = torch.cat(
            [
                p.offsets.to(dtype) if p.offsets is not None else torch.zeros_like(p.scales, dtype=dtype)
                for p in parts
            ],
            dim=1,
        )
    return PackedW4(
        qweight=torch.cat([p.qweight for p in parts], dim=1),
        scales=torch.cat([p.scales for p in parts], dim=1),
        zeros=zeros,
        group_size=first.group_size,
        g_idx=first.g_idx,
        offsets=offsets,
    )
