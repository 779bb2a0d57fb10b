"""Cutting a Hugging Face checkpoint folder into the blocks of its chain, with the runtime's own loader.

The tensors stay views of the memory-mapped weight files, and a block's id depends only on its
content, so neither the sharding of the files nor the order of tensors in them changes any id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from runtime.checkpoint_loader import checkpoint_files, read_tensors, split_into_blocks, validate_split
from runtime.model_config import ModelConfig
from zoo.blocks import BlockData, BlockKind, fields_for
from zoo.quantized_checkpoint import (
    CheckpointQuantization,
    bias_flags,
    checkpoint_quantization,
    convert_layer,
)

Progress = Callable[[int, int], None]


class SplitCheckpoint(NamedTuple):
    """A checkpoint as the zoo sees it: `blocks` in chain order `[embed, layer 0 … layer L-1, head]`."""

    config: ModelConfig
    raw_config: dict[str, Any]
    blocks: list[BlockData]

    @property
    def block_ids(self) -> list[str]:
        return [b.block_id for b in self.blocks]


def split_checkpoint(folder: Path, progress: Progress | None = None) -> SplitCheckpoint:
    """Split `folder` into blocks and hash each; `progress(done, total)` is called after every block.

    A tied model's head holds only `norm.weight` (tied=True): its lm_head is the embed block's
    weight. GPTQ and AWQ checkpoints become 4-bit layer blocks (see `zoo.quantized_checkpoint`). Every block is checked against the config (names and shapes) before it is hashed, so
    a broken checkpoint fails here, naming the tensor, before anything reaches the store.
    """
    folder = Path(folder)
    config = ModelConfig.from_folder(folder)  # raises the runtime's clear errors for a bad config
    raw_config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    embed, layers, head = split_into_blocks(read_tensors(checkpoint_files(folder)), config)
    quant = checkpoint_quantization(raw_config, config.hidden_size)
    if quant is not None:
        flags = bias_flags(config.qkv_bias, config.o_bias, config.mlp_bias)
        layers = [convert_layer(t, quant, flags, f"layer {i}") for i, t in enumerate(layers)]
    tied = config.tie_word_embeddings
    # Building the runtime's blocks validates every tensor name and shape; they are only views.
    validate_split(config, embed, layers, head)
    pending: list[tuple[BlockKind, dict[str, torch.Tensor], dict[str, Any]]] = [
        ("embed", embed, fields_for("embed", config)),
        *(("layer", t, _layer_fields(config, i, quant)) for i, t in enumerate(layers)),
        ("head", head, fields_for("head", config, tied=tied)),
    ]
    blocks: list[BlockData] = []
    for kind, tensors, fields in pending:
        block = BlockData(kind=kind, tensors=tensors, fields=fields)
        _ = block.block_id  # hashing is the slow part; do it here so progress means something
        blocks.append(block)
        if progress is not None:
            progress(len(blocks), len(pending))
    return SplitCheckpoint(config, raw_config, blocks)


def _layer_fields(config: ModelConfig, index: int, quant: CheckpointQuantization | None) -> dict[str, Any]:
    fields = fields_for("layer", config, index)
    return fields if quant is None else {**fields, "quantization": quant.fields()}
