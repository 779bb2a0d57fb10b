"""GPTQ: 4-bit quantization that corrects each column's rounding error with the rest of the row.

Frantar et al. (2022). For a linear layer with weight W [N, K] and calibration inputs X, the layer
output error ‖(W − Q) Xᵀ‖² is a quadratic form in each row of W − Q with Hessian H = 2 X Xᵀ / n.
Quantizing columns one at a time and spreading each column's error over the not-yet-quantized
columns through the inverse Hessian (its upper Cholesky factor, so every update is one row of it)
keeps that error far below round-to-nearest's for the same grid. Columns go in blocks so the
updates of a block's columns to the rest are one matmul.

Group scales and zero points are chosen when the first column of a group is reached, from the
group's already error-corrected weights. With `act_order`, columns go in order of decreasing
Hessian diagonal (the inputs with the most energy first); groups are then formed in that order,
which is what GPTQ's `desc_act` checkpoints record in `g_idx`.
"""

from __future__ import annotations

import torch

from kernels.w4a16_format import MAX_CODE, PER_WORD, SYMMETRIC_ZERO, PackedW4, pack_codes


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over every calibration row seen by one projection input."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum.addmm_(x2.t(), x2)
        self.rows += int(x2.shape[0])

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no calibration rows were recorded for this projection")
        return (2.0 / self.rows) * self.sum


def _grid(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per output row for the columns `w` [N, g] (the same grid as RTN)."""
    if symmetric:
        scale = w.abs().amax(dim=1) / (SYMMETRIC_ZERO - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, SYMMETRIC_ZERO)
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    scale = (hi - lo) / MAX_CODE
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale).clamp(0, MAX_CODE)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after dampening H's diagonal by `damp` × its mean."""
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype)
    h = h + damp * float(torch.diagonal(h).mean()) * eye
    for attempt in range(5):
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse: torch.Tensor = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
            return inverse
        # Too few calibration rows for the width leaves H singular: dampen more, as GPTQ users do.
        h = h + (10.0**attempt) * damp * float(torch.diagonal(h).mean()) * eye
    raise ValueError("the calibration Hessian is not positive definite even after dampening")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
) -> PackedW4:
    """Quantize W [N, K] to the canonical 4-bit layout, minimising the output error under `hessian` [K, K]."""
    n, k = weight.shape
    if k % group_size or group_size % PER_WORD:
        raise ValueError(f"K = {k} must be a multiple of the group size {group_size}, itself of {PER_WORD}")
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {list(hessian.shape)}")
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    # Inputs that never fired carry no information: pin them so H stays invertible, zero their weights.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)

    # Blocks are whole groups, so a group's grid is always taken from fully corrected columns.
    step = max(group_size, (block_size // group_size) * group_size)
    codes = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(k // group_size, n, dtype=torch.float64)
    zeros = torch.zeros(k // group_size, n, dtype=torch.float64)
    for start in range(0, k, step):
        end = min(start + step, k)
        w1 = w[:, start:end].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        scale = zero = torch.empty(0)
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:
                scale, zero = _grid(w1[:, i : i + group_size], symmetric)
                scales[col // group_size] = scale
                zeros[col // group_size] = zero
            q = torch.round(w1[:, i] / scale + zero).clamp(0, MAX_CODE)
            codes[:, col] = q.to(torch.int32)
            err = (w1[:, i] - (q - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, end:] -= err1 @ hinv[start:end, end:]

    # Back to the input order: each input keeps its code and records the group it was quantized in.
    inverse = torch.argsort(perm)
    codes = codes[:, inverse]
    g_idx = (torch.arange(k) // group_size)[inverse].to(torch.int32) if act_order else None
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return PackedW4(
        qweight=pack_codes(codes.t().contiguous()),
        scales=scales.to(dtype),
        zeros=None if symmetric else zeros.to(torch.int32),
        group_size=group_size,
        g_idx=g_idx,
    )
