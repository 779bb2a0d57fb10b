"""LoRA deltas on a layer block: out += scaling · (h Aᵀ) Bᵀ for each targeted projection.

A delta never changes the block it sits on: the base projection runs as it always does, and the
low-rank term is added to its output. That is what lets many adapters share one resident base
block (and, later, one batched base matmul).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from runtime.row_ranges import Rows

# The projections of a Llama-family layer that an adapter may target, by block-local name.
PROJECTIONS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class LoraProjection(NamedTuple):
    """One projection's adapter: A is [r, in], B is [out, r]; the delta is scaling · B A."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


class FusedLora(NamedTuple):
    """The adapter of projections that read the same input, ready for one shrink matmul.

    `a_t` is [in, Σr]: the A matrices side by side, so h @ a_t is every projection's h Aᵀ at once.
    `parts` holds, per projection present, its position among the names asked for, its columns of
    that product, and Bᵀ with the scaling folded in ([r, out], contiguous).
    """

    a_t: torch.Tensor
    parts: list[tuple[int, slice, torch.Tensor]]


class LayerLora:
    """The LoRA projections of one layer for one model (any subset of PROJECTIONS)."""

    def __init__(self, projections: dict[str, LoraProjection]) -> None:
        unknown = set(projections) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown LoRA target(s): {', '.join(sorted(unknown))}")
        self.projections = projections
        # Built on first use per group of names; the projections never change after construction.
        self._fused: dict[tuple[str, ...], FusedLora | None] = {}

    def fused(self, names: tuple[str, ...]) -> FusedLora | None:
        """The projections among `names` fused for one shrink matmul (None if none is adapted)."""
        if names not in self._fused:
            present = [(i, self.projections[n]) for i, n in enumerate(names) if n in self.projections]
            if not present:
                self._fused[names] = None
            else:
                parts, start = [], 0
                for i, p in present:
                    parts.append((i, slice(start, start + p.rank), (p.b.t() * p.scaling).contiguous()))
                    start += p.rank
                a_t = torch.cat([p.a for _, p in present]).t().contiguous()
                self._fused[names] = FusedLora(a_t, parts)
        return self._fused[names]

    def add(self, name: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base projection of `h`) plus this layer's delta for projection `name`."""
        p = self.projections.get(name)
        if p is None:
            return out
        return out + (h @ p.a.t()) @ p.b.t() * p.scaling

    def cast(self, dtype: torch.dtype) -> LayerLora:
        return LayerLora(
            {
                name: LoraProjection(p.a.to(dtype), p.b.to(dtype), p.scaling)
                for name, p in self.projections.items()
            }
        )


class DeltaGroups:
    """Which rows of one block execution use which delta: rows sharing an adapter form one segment.

    Each projection then costs the base matmul once for all rows plus one low-rank pair per
    distinct adapter (whatever its rank), never one call per request.
    """

    def __init__(self, segments: list[tuple[LayerLora, Rows]]) -> None:
        self.segments = segments

    @classmethod
    def single(cls, lora: LayerLora | None) -> DeltaGroups:
        return cls([] if lora is None else [(lora, None)])

    def __bool__(self) -> bool:
        return bool(self.segments)

    def add(self, name: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.add_fused((name,), h, [out])[0]

    def add_fused(
        self, names: tuple[str, ...], h: torch.Tensor, outs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Add the deltas of projections `names`, which all read `h`, to their outputs `outs` (in place).

        Per adapter: one shrink matmul for all the projections, then one expand matmul per
        projection added into its rows; the outputs are fresh results of the base matmuls, so
        adding in place is safe and saves a copy per adapter. Rows given as a slice (the executor
        orders rows by chain, so that is the usual case) are views: no gather, and the expand
        accumulates straight into them. Rows given as indices are gathered and `index_add_`ed.

        On the GPU, the segmented Triton kernels do the same for all adapters at once (one shrink
        launch, one expand launch per projection). They need the segments' rows to be disjoint, so
        a segment of all rows next to others stays on the loop below.
        """
        if h.is_cuda and (len(self.segments) == 1 or all(rows is not None for _, rows in self.segments)):
            from kernels.lora_triton import lora_add_fused  # triton is imported only where it runs

            return lora_add_fused(
                [(lora.fused(names), _indices(rows)) for lora, rows in self.segments], h, outs
            )
        for lora, rows in self.segments:
            fused = lora.fused(names)
            if fused is None:
                continue
            if rows is None:
                z = h @ fused.a_t
                for i, cols, b_t in fused.parts:
                    outs[i].addmm_(z[:, cols], b_t)
            elif isinstance(rows, slice):
                z = h[rows] @ fused.a_t
                for i, cols, b_t in fused.parts:
                    outs[i][rows].addmm_(z[:, cols], b_t)
            else:
                z = h.index_select(0, rows) @ fused.a_t
                for i, cols, b_t in fused.parts:
                    outs[i].index_add_(0, rows, z[:, cols] @ b_t)
        return outs


def _indices(rows: Rows) -> torch.Tensor | None:
    """Rows as an index tensor (None stays None), for kernels that take indices."""
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop)
    return rows
