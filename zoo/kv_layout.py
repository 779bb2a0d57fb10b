"""Where the models of one base diverge from it: the layer cuts that let them share KV pages.

A model whose chain equals its base's through layer i - 1 and differs at layer i (a new block, or a
delta on the base's block) computes the base's KV in layers 0 … i-1. Cutting the engine's KV at such
layers lets a base request and this model's requests share those layers' pages
(runtime.kv_segments). A model that differs already at the embedding or layer 0 (most LoRA
adapters) shares nothing and needs no cut.
"""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select

from zoo.catalog.models import BaseModel, Model
from zoo.catalog.types import ModelStatus
from zoo.catalog_writer import model_entries
from zoo.chain_loader import ChainEntry
from zoo.registry import Zoo


def first_divergent_layer(base: list[ChainEntry], model: list[ChainEntry]) -> int | None:
    """The first layer where `model`'s chain leaves `base`'s (None if the layers all agree).

    Chain position 0 is the embedding and position i + 1 layer i, so a divergence at the embedding
    counts as layer 0.
    """
    num_layers = len(base) - 2
    for position in range(num_layers + 1):
        if position >= len(model) or model[position] != base[position]:
            return max(0, position - 1)
    return None


def divergence_counts(zoo: Zoo, base_name: str) -> Counter[int]:
    """For each layer, how many ready models of base `base_name` first diverge from it there."""
    counts: Counter[int] = Counter()
    with zoo.sessions() as session:
        base = session.scalar(select(Model).where(Model.tenant_id.is_(None), Model.name == base_name))
        base_row = session.scalar(select(BaseModel).where(BaseModel.name == base_name))
        if base is None or base_row is None:
            return counts
        base_entries = model_entries(session, base.id)
        models = session.scalars(
            select(Model.id).where(
                Model.base_model_id == base_row.id, Model.status == ModelStatus.READY, Model.id != base.id
            )
        ).all()
        for model_id in models:
            layer = first_divergent_layer(base_entries, model_entries(session, model_id))
            if layer is not None:
                counts[layer] += 1
    return counts


def kv_cuts(zoo: Zoo, base_name: str, max_segments: int) -> list[int]:
    """At most `max_segments - 1` inner layer cuts, where the most models diverge."""
    if max_segments <= 1:
        return []
    counts = divergence_counts(zoo, base_name)
    inner = [(n, layer) for layer, n in counts.items() if layer > 0]
    inner.sort(key=lambda item: (-item[0], item[1]))
    return sorted(layer for _, layer in inner[: max_segments - 1])
