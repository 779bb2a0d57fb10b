"""Plain torch references for the segmented LoRA kernels (`kernels.lora_triton`): fp32, one loop per segment.

Slow by design and written to be obviously right: the kernels' tests compare against these, so they
gather, multiply and scatter each segment on its own with nothing fused or packed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from runtime.lora import FusedLora


def _rows(rows: torch.Tensor | None, num_rows: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_rows, device=device) if rows is None else rows.to(device).long()


def lora_shrink_reference(
    x: torch.Tensor, segments: Sequence[tuple[FusedLora | None, torch.Tensor | None]]
) -> list[torch.Tensor | None]:
    """Per segment, `x[rows] @ Aᵀ` in fp32 ([rows, Σr]); None where the adapter targets nothing."""
    zs: list[torch.Tensor | None] = []
    for fused, rows in segments:
        if fused is None:
            zs.append(None)
            continue
        index = _rows(rows, x.shape[0], x.device)
        zs.append(x.float().index_select(0, index) @ fused.a_t.float())
    return zs


def lora_expand_reference(
    zs: Sequence[torch.Tensor | None],
    segments: Sequence[tuple[FusedLora | None, torch.Tensor | None]],
    outs: Sequence[torch.Tensor],
) -> None:
    """Add each segment's `z[:, cols] @ (Bᵀ·scaling)` into its rows of `outs[j]`, in fp32, in place.

    Like the kernel, z is first rounded to the weights' dtype; every output is rounded once at the end.
    """
    acc = [out.float() for out in outs]
    for z, (fused, rows) in zip(zs, segments, strict=True):
        if fused is None or z is None:
            continue
        index = _rows(rows, outs[0].shape[0], z.device)
        z_w = z.to(fused.a_t.dtype).float()
        for j, cols, b_t in fused.parts:
            acc[j].index_add_(0, index, z_w[:, cols] @ b_t.float())
    for out, a in zip(outs, acc, strict=True):
        out.copy_(a.to(out.dtype))


def lora_add_fused_reference(
    segments: Sequence[tuple[FusedLora | None, torch.Tensor | None]],
    h: torch.Tensor,
    outs: list[torch.Tensor],
) -> list[torch.Tensor]:
    """The whole delta: shrink then expand, per segment; returns `outs` (changed in place)."""
    lora_expand_reference(lora_shrink_reference(h, segments), segments, outs)
    return outs
