"""Projections that read the same input, run as one matmul: q/k/v, and gate/up.

A decode step of a small model is mostly per-operation overhead: each projection is one matmul
call (and, for 4-bit weights, a cast of the activations to bf16 and back). Fusing the projections of
one input into one weight cuts seven matmuls per layer to four, built once when the block loads.

- Dense: the weights are concatenated along the outputs once; each projection's weight becomes a
  view of its rows of the fused weight, so the block holds one copy. Each output is still one dot
  product over the same inputs, and the results were bit-identical to the separate matmuls on
  every shape tried (MKL, fp32), which the fp32 oracle tests check end to end.
- 4-bit: the packed weights are concatenated along N (`concat_packed`, which carries zero points
  and offsets) and packed once for the CPU kernel, or kept packed for the Triton kernel.

Projections of mixed kinds (a dense q with 4-bit k, say) are not fused; the layer then runs them
one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.w4a16_cpu import CpuInt4Linear
from kernels.w4a16_format import PackedW4, concat_packed
from runtime.linear import DenseLinear, Int4Linear, Linear


class FusedLinear:
    """`y = x Wᵀ + b` over several projections' weights side by side; `split` cuts y back apart."""

    def __init__(
        self, sizes: list[int], dense: torch.Tensor | None, packed: PackedW4 | None, bias: torch.Tensor | None
    ) -> None:
        self.sizes = sizes
        self.weight = dense
        self.bias = bias
        self.packed: PackedW4 | None = None
        self._cpu: CpuInt4Linear | None = None
        if packed is not None:
            if packed.qweight.device.type == "cpu":
                # Only the CPU kernel's own packing is kept: the concatenated codes would be a copy.
                self._cpu = CpuInt4Linear(packed, bias)
            else:
                self.packed = packed

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        if self._cpu is not None:
            return self._cpu(x)
        from kernels.w4a16_triton import w4a16_matmul  # only where a GPU runs the layer

        assert self.packed is not None  # one of the three is always set (see fuse_linears)
        out = w4a16_matmul(x.reshape(-1, x.shape[-1]), self.packed).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Each projection's columns of `y` (views)."""
        return list(y.split(self.sizes, dim=-1))


def _fused_bias(parts: list[Linear]) -> tuple[bool, torch.Tensor | None]:
    biases = [p.bias for p in parts]
    if all(b is None for b in biases):
        return True, None
    if any(b is None for b in biases):
        return False, None
    return True, torch.cat([b for b in biases if b is not None])


def fuse_linears(parts: list[Linear]) -> tuple[FusedLinear, list[Linear]] | None:
    """One fused projection for `parts`, and the parts rebuilt on its storage where they are dense.

    None when the parts cannot be fused (mixed kinds, dtypes or 4-bit layouts, or only some with a
    bias); the caller then keeps running them one by one.
    """
    ok, bias = _fused_bias(parts)
    if not ok:
        return None
    sizes = [p.out_features for p in parts]
    if all(isinstance(p, DenseLinear) for p in parts):
        weights = [p.weight for p in parts if isinstance(p, DenseLinear)]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return None
        fused = torch.cat(weights)
        views: list[Linear] = []
        start = 0
        for size in sizes:
            b = None if bias is None else bias[start : start + size]
            views.append(DenseLinear(fused[start : start + size], b))
            start += size
        return FusedLinear(sizes, fused, None, bias), views
    if all(isinstance(p, Int4Linear) for p in parts):
        try:
            packed = concat_packed([p.packed for p in parts if isinstance(p, Int4Linear)])
        except ValueError:
            return None
        return FusedLinear(sizes, None, packed, bias), parts
    return None
