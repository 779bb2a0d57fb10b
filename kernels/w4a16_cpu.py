"""W4A16 on the CPU: torch's int4 "tinygemm" kernel, packed once at load, or dequantize-then-matmul.

`torch.ops.aten._weight_int4pack_mm_for_cpu` reads int4 codes in its own packed form and computes
with bf16 activations (its fast path; fp32 and fp16 activations are converted here). Its weight is
`(code - 8) · scale + offset` per group, so our zero points (and optional offsets) become its
offsets `(8 - zero) · scale + offset`.
Act-order checkpoints (`g_idx`) are handled by permuting the input columns once so that every group
is contiguous, and permuting each activation row the same way. Group sizes the kernel does not
take, K not a multiple of the group size, or N not a multiple of 16, use the dense fallback (still
exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.w4a16_format import SYMMETRIC_ZERO, PackedW4, dequantize, unpack_codes

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
TINYGEMM_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu refuses other output counts


def act_order_permutation(packed: PackedW4) -> torch.Tensor | None:
    """Input order that makes act-order groups contiguous (None if they already are)."""
    if packed.g_idx is None:
        return None
    groups = packed.g_idx.long()
    if torch.equal(groups, torch.arange(packed.in_features) // packed.group_size):
        return None
    return torch.argsort(groups, stable=True)


def tinygemm_supported(packed: PackedW4) -> bool:
    if packed.group_size not in TINYGEMM_GROUP_SIZES or packed.in_features % packed.group_size:
        return False
    if packed.out_features % TINYGEMM_N_MULTIPLE:
        return False
    if packed.g_idx is not None:
        counts = torch.bincount(packed.g_idx.long())
        return bool((counts == packed.group_size).all())
    return True


class CpuInt4Linear:
    """`y = x Wᵀ (+ bias)` with W stored as 4-bit codes, for the CPU."""

    def __init__(self, packed: PackedW4, bias: torch.Tensor | None = None) -> None:
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.group_size = packed.group_size
        self.bias = bias
        self.perm = act_order_permutation(packed)
        self.fast = tinygemm_supported(packed)
        self._dense: torch.Tensor | None = None
        if not self.fast:
            self._dense = dequantize(packed, torch.float32)
            return
        codes = unpack_codes(packed.qweight)  # [K, N]
        groups = packed.groups()
        zeros, scales = packed.zero_points(), packed.scales.float()
        offsets = (SYMMETRIC_ZERO - zeros).float() * scales
        if packed.offsets is not None:
            offsets = offsets + packed.offsets.float()
        if self.perm is not None:
            codes = codes.index_select(0, self.perm)
            groups = groups.index_select(0, self.perm)
            # After the permutation the j-th block of g inputs is one group: its id, in order.
            order = groups.reshape(-1, packed.group_size)[:, 0]
            offsets, scales = offsets.index_select(0, order), scales.index_select(0, order)
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
        self.scale_and_offset = torch.stack([scales, offsets], dim=-1).to(torch.bfloat16).contiguous()

    @property
    def nbytes(self) -> int:
        if self._dense is not None:
            return self._dense.nbytes
        return int(self.weight.nbytes) + int(self.scale_and_offset.nbytes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._dense is not None:
            out = F.linear(x2.float(), self._dense).to(x.dtype)
        else:
            if self.perm is not None:
                x2 = x2.index_select(1, self.perm)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.weight, self.group_size, self.scale_and_offset
            ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)
