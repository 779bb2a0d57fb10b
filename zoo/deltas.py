"""Low-rank deltas as zoo content: LoRA adapters and compressed fine-tune layers.

Both kinds are the same arithmetic, out += scaling · (h Aᵀ) Bᵀ per projection, so both become
a runtime LayerLora. A delta's tensors are named `<projection>.lora_a` / `<projection>.lora_b`
and its fields carry each projection's scaling, which is part of the delta's identity.
"""

from __future__ import annotations

import torch

from runtime.lora import PROJECTIONS, LayerLora, LoraProjection
from zoo.blocks import DeltaData, DeltaKind, InvalidContentError


def make_delta(kind: DeltaKind, projections: dict[str, LoraProjection]) -> DeltaData:
    """A content-addressed delta for one layer (`kind` is "lora" or "lowrank")."""
    if not projections:
        raise InvalidContentError("a delta needs at least one projection")
    tensors: dict[str, torch.Tensor] = {}
    scaling: dict[str, float] = {}
    for name, p in sorted(projections.items()):
        if name not in PROJECTIONS:
            raise InvalidContentError(f"unknown projection {name!r}")
        tensors[f"{name}.lora_a"] = p.a.contiguous()
        tensors[f"{name}.lora_b"] = p.b.contiguous()
        scaling[name] = float(p.scaling)
    return DeltaData(kind=kind, tensors=tensors, fields={"scaling": scaling})


def delta_projections(delta: DeltaData) -> dict[str, LoraProjection]:
    scaling = delta.fields.get("scaling")
    if not isinstance(scaling, dict):
        raise InvalidContentError(f"delta {delta.delta_id}: fields lack per-projection scaling")
    out: dict[str, LoraProjection] = {}
    for name, s in scaling.items():
        a = delta.tensors.get(f"{name}.lora_a")
        b = delta.tensors.get(f"{name}.lora_b")
        if a is None or b is None or a.shape[0] != b.shape[1]:
            raise InvalidContentError(f"delta {delta.delta_id}: projection {name} lacks matching A/B tensors")
        out[name] = LoraProjection(a, b, float(s))
    return out


def layer_lora(deltas: list[DeltaData], dtype: torch.dtype) -> LayerLora | None:
    """The runtime form of the deltas on one chain position (None when there are none).

    Two deltas on the same projection are stacked along the rank axis with their scalings folded
    into B, which computes the same sum in one pair of matmuls.
    """
    if not deltas:
        return None
    merged: dict[str, LoraProjection] = {}
    for delta in deltas:
        for name, p in delta_projections(delta).items():
            prev = merged.get(name)
            if prev is None:
                merged[name] = p
            else:
                merged[name] = LoraProjection(
                    torch.cat([prev.a, p.a.to(prev.a.dtype)]),
                    torch.cat([prev.b * prev.scaling, (p.b * p.scaling).to(prev.b.dtype)], dim=1),
                    1.0,
                )
    return LayerLora(merged).cast(dtype)
