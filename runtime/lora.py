"""LoRA deltas on a layer block: out += scaling · (h Aᵀ) Bᵀ for each targeted projection.

A delta never changes the block it sits on: the base projection runs as it always does, and the
low-rank term is added to its output. That is what lets many adapters share one resident base
block (and, later, one batched base matmul).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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


class LayerLora:
    """The LoRA projections of one layer for one model (any subset of PROJECTIONS)."""

    def __init__(self, projections: dict[str, LoraProjection]) -> None:
        unknown = set(projections) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown LoRA target(s): {', '.join(sorted(unknown))}")
        self.projections = projections

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

    def __init__(self, segments: list[tuple[LayerLora, torch.Tensor | None]]) -> None:
        self.segments = segments

    @classmethod
    def single(cls, lora: LayerLora | None) -> DeltaGroups:
        return cls([] if lora is None else [(lora, None)])

    def __bool__(self) -> bool:
        return bool(self.segments)

    def add(self, name: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for lora, rows in self.segments:
            p = lora.projections.get(name)
            if p is None:
                continue
            if rows is None:
                out = out + (h @ p.a.t()) @ p.b.t() * p.scaling
            else:
                out = out.index_add(0, rows, (h.index_select(0, rows) @ p.a.t()) @ p.b.t() * p.scaling)
        return out
