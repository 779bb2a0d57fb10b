"""The linear projections a layer block runs: dense weights, or 4-bit weights with 16-bit activations.

A block's tensors decide which: `<proj>.weight` makes a dense projection, `<proj>.qweight` (with
`<proj>.scales`, and optionally `<proj>.qzeros`, `<proj>.g_idx` and `<proj>.qoffsets`) a 4-bit one in the canonical
packed layout of `kernels.w4a16_format`. Everything downstream (LoRA deltas, per-block batching)
sees only `y = proj(x)`, which is what lets QLoRA-style chains, a 4-bit base with 16-bit adapters,
share batches with anything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.w4a16_cpu import CpuInt4Linear
from kernels.w4a16_format import PER_WORD, PackedW4, dequantize
from runtime.errors import CorruptCheckpointError

# Block-local tensor suffixes of a 4-bit projection.
QWEIGHT, SCALES, QZEROS, G_IDX = "qweight", "scales", "qzeros", "g_idx"
QOFFSETS = "qoffsets"  # floating point per group, added after scaling (GGUF Q4_1's minimum)


class DenseLinear:
    """`y = x Wᵀ + b` with W [out, in] as stored."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int4Linear:
    """`y = x Wᵀ + b` with W in 4 bits: tinygemm on the CPU (packed once, on first use), Triton on a GPU.

    Packing waits for the first call: a layer that runs its projections fused (runtime/fused_linear.py)
    never calls these, and packing them too would double the kernel's copy of the weights.
    """

    def __init__(self, packed: PackedW4, bias: torch.Tensor | None) -> None:
        self.packed = packed
        self.bias = bias
        self._cpu: CpuInt4Linear | None = None

    @property
    def out_features(self) -> int:
        return self.packed.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.qweight.device.type == "cpu":
            if self._cpu is None:
                self._cpu = CpuInt4Linear(self.packed, self.bias)
            return self._cpu(x)
        from kernels.w4a16_triton import w4a16_matmul  # only where a GPU runs the layer

        out = w4a16_matmul(x.reshape(-1, x.shape[-1]), self.packed).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


Linear = DenseLinear | Int4Linear


def _check(t: torch.Tensor, name: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise CorruptCheckpointError(
            f"{where}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}"
        )
    return t


def make_linear(
    tensors: dict[str, torch.Tensor],
    prefix: str,
    out_features: int,
    in_features: int,
    has_bias: bool,
    where: str,
) -> Linear:
    """The projection `prefix` of a block: dense from `prefix.weight`, 4-bit from `prefix.qweight`."""
    bias = None
    if has_bias:
        name = f"{prefix}.bias"
        if name not in tensors:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} is missing")
        bias = _check(tensors[name], name, (out_features,), where)
    qname = f"{prefix}.{QWEIGHT}"
    if qname not in tensors:
        name = f"{prefix}.weight"
        if name not in tensors:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} is missing")
        return DenseLinear(_check(tensors[name], name, (out_features, in_features), where), bias)
    return Int4Linear(read_packed(tensors, prefix, out_features, in_features, where), bias)


def read_packed(
    tensors: dict[str, torch.Tensor], prefix: str, out_features: int, in_features: int, where: str
) -> PackedW4:
    """The 4-bit projection `prefix` of a block's tensors, every one checked (CorruptCheckpointError)."""
    qname = f"{prefix}.{QWEIGHT}"
    if qname not in tensors:
        raise CorruptCheckpointError(f"{where}: tensor {qname!r} is missing")
    if in_features % PER_WORD:
        raise CorruptCheckpointError(f"{where}: {prefix} has {in_features} inputs, not a multiple of 8")
    qweight = _check(tensors[qname], qname, (in_features // PER_WORD, out_features), where)
    sname = f"{prefix}.{SCALES}"
    if sname not in tensors:
        raise CorruptCheckpointError(f"{where}: tensor {sname!r} is missing")
    scales = tensors[sname]
    num_groups = int(scales.shape[0]) if scales.dim() == 2 else 0
    if num_groups < 1 or in_features % num_groups:
        raise CorruptCheckpointError(f"{where}: {sname} has shape {list(scales.shape)}")
    _check(scales, sname, (num_groups, out_features), where)
    zeros = tensors.get(f"{prefix}.{QZEROS}")
    if zeros is not None:
        _check(zeros, f"{prefix}.{QZEROS}", (num_groups, out_features), where)
    g_idx = tensors.get(f"{prefix}.{G_IDX}")
    if g_idx is not None:
        _check(g_idx, f"{prefix}.{G_IDX}", (in_features,), where)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
            raise CorruptCheckpointError(f"{where}: {prefix}.{G_IDX} names groups outside [0, {num_groups})")
    if qweight.dtype != torch.int32 or (zeros is not None and zeros.dtype != torch.int32):
        raise CorruptCheckpointError(f"{where}: {prefix} codes must be int32")
    if not scales.is_floating_point():
        raise CorruptCheckpointError(f"{where}: {sname} must be floating point, got {scales.dtype}")
    oname = f"{prefix}.{QOFFSETS}"
    offsets = tensors.get(oname)
    if offsets is not None:
        _check(offsets, oname, (num_groups, out_features), where)
        if not offsets.is_floating_point():
            raise CorruptCheckpointError(f"{where}: {oname} must be floating point, got {offsets.dtype}")
    return PackedW4(qweight, scales, zeros, in_features // num_groups, g_idx, offsets)


def dense_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A block's tensors with each 4-bit projection as the fp32 `<proj>.weight` it computes with.

    Comparisons between blocks (equivalence, delta compression) read weights through this, so a
    4-bit block, offsets and all, compares with a dense one by what it computes.
    """
    quantized = [name[: -len(QWEIGHT) - 1] for name in tensors if name.endswith(f".{QWEIGHT}")]
    suffixes = (QWEIGHT, SCALES, QZEROS, G_IDX, QOFFSETS)
    out = {k: t for k, t in tensors.items() if not any(k == f"{p}.{s}" for p in quantized for s in suffixes)}
    for prefix in quantized:
        qweight = tensors[f"{prefix}.{QWEIGHT}"]
        if qweight.dim() != 2:
            raise CorruptCheckpointError(f"{where}: {prefix}.{QWEIGHT} has shape {list(qweight.shape)}")
        n, k = int(qweight.shape[1]), int(qweight.shape[0]) * PER_WORD
        out[f"{prefix}.weight"] = dequantize(read_packed(tensors, prefix, n, k, where), torch.float32)
    return out


def packed_tensors(prefix: str, packed: PackedW4) -> dict[str, torch.Tensor]:
    """The block-local tensors that store `packed` as projection `prefix` (read back by make_linear)."""
    out = {f"{prefix}.{QWEIGHT}": packed.qweight, f"{prefix}.{SCALES}": packed.scales}
    if packed.zeros is not None:
        out[f"{prefix}.{QZEROS}"] = packed.zeros
    if packed.g_idx is not None:
        out[f"{prefix}.{G_IDX}"] = packed.g_idx.to(torch.int32)
    if packed.offsets is not None:
        out[f"{prefix}.{QOFFSETS}"] = packed.offsets
    return out


def cast_floating(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, copy: bool = False
) -> dict[str, torch.Tensor]:
    """Floating tensors (weights, 4-bit scales and offsets) in `dtype`; integer ones (codes, zero
    points, g_idx) as they are.

    Same-dtype tensors stay views (of a memory map, say) unless `copy` asks for private copies.
    """
    out: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if t.is_floating_point():
            out[k] = t.to(dtype, copy=copy)
        else:
            out[k] = t.clone() if copy else t
    return out
