"""Chains whose blocks are loaded from the store into a residency budget, one block at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from runtime.blocks import EmbedBlock, HeadBlock, LayerBlock
from runtime.chain import ResidentChain
from runtime.linear import cast_floating
from runtime.lora import LayerLora
from runtime.model_config import ModelConfig
from runtime.residency import BlockResidency
from runtime.rope import RotaryTable
from zoo.block_store import BlockStore


def _materialize(store: BlockStore, block_id: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # A private copy: the block costs memory while resident and must be read again once evicted.
    return cast_floating(store.load(block_id).tensors, dtype, copy=True)


def _size(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors.values())


def resident_chain(
    store: BlockStore,
    entries: list[Any],
    config: ModelConfig,
    dtype: torch.dtype,
    digest: bytes,
    deltas: list[LayerLora | None],
    residency: BlockResidency,
) -> ResidentChain:
    """Keys are block ids plus dtype, so chains sharing a block share one resident copy."""
    suffix = str(dtype).removeprefix("torch.")
    ids = [e.block_id for e in entries]
    keys = [f"{bid}:{suffix}" for bid in ids]
    loaders: list[Callable[[], tuple[Any, int]]] = []

    def embed_loader() -> tuple[Any, int]:
        tensors = _materialize(store, ids[0], dtype)
        return EmbedBlock(tensors, config), _size(tensors)

    loaders.append(embed_loader)
    for i in range(config.num_layers):

        def layer_loader(i: int = i) -> tuple[Any, int]:
            tensors = _materialize(store, ids[i + 1], dtype)
            return LayerBlock(tensors, config, where=f"layer {i}"), _size(tensors)

        loaders.append(layer_loader)
    head_tensors_tied = "lm_head.weight" not in store.load(ids[-1]).tensors
    chain_ref: list[ResidentChain] = []

    def head_loader() -> tuple[Any, int]:
        tensors = _materialize(store, ids[-1], dtype)
        # A tied head projects with the embedding block's weight, which the chain keeps resident.
        tied = chain_ref[0].embed.weight if head_tensors_tied else None
        return HeadBlock(tensors, config, tied_embedding=tied), _size(tensors)

    if head_tensors_tied:
        keys[-1] = f"{ids[-1]}+{ids[0]}:{suffix}"
    loaders.append(head_loader)
    chain = ResidentChain(
        config,
        keys,
        loaders,
        residency,
        RotaryTable(config.rope, config.head_dim, dtype),
        dtype,
        digest,
        deltas,
    )
    chain_ref.append(chain)
    return chain
