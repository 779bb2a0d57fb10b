"""Turn a parsed PEFT adapter into chain entries on top of its base's chain."""

from __future__ import annotations

from typing import NamedTuple

from runtime.model_config import ModelConfig
from zoo.block_store import BlockStore
from zoo.blocks import BlockData, DeltaData, fields_for
from zoo.chain_loader import ChainEntry
from zoo.deltas import make_delta
from zoo.peft_adapter import PeftAdapter


class AdapterChain(NamedTuple):
    """The adapter's chain, and the blocks and deltas it adds that the base does not have."""

    entries: list[ChainEntry]
    new_blocks: list[BlockData]
    deltas: list[DeltaData]


def adapter_chain(
    adapter: PeftAdapter, base_entries: list[ChainEntry], config: ModelConfig, store: BlockStore
) -> AdapterChain:
    """Each targeted layer keeps its base block and gains one LoRA delta; saved modules become blocks."""
    entries = list(base_entries)
    deltas: list[DeltaData] = []
    for i, projections in enumerate(adapter.layers):
        if projections:
            delta = make_delta("lora", projections)
            deltas.append(delta)
            entries[i + 1] = ChainEntry(entries[i + 1].block_id, (*entries[i + 1].delta_ids, delta.delta_id))
    new_blocks: list[BlockData] = []
    embed = adapter.modules_to_save.get("embed_tokens.weight")
    if embed is not None:
        block = BlockData(
            kind="embed", tensors={"embed_tokens.weight": embed}, fields=fields_for("embed", config)
        )
        new_blocks.append(block)
        entries[0] = ChainEntry(block.block_id)
    lm_head = adapter.modules_to_save.get("lm_head.weight")
    if lm_head is None and embed is not None and config.tie_word_embeddings:
        # peft replaces only the embedding module; the tied head keeps projecting with the base's.
        lm_head = store.load(base_entries[0].block_id).tensors["embed_tokens.weight"]
    if lm_head is not None:
        # The saved lm_head replaces the head's projection; the final norm stays the base's.
        base_head = store.load(base_entries[-1].block_id)
        block = BlockData(
            kind="head",
            tensors={"norm.weight": base_head.tensors["norm.weight"], "lm_head.weight": lm_head},
            fields=fields_for("head", config, tied=False),
        )
        new_blocks.append(block)
        entries[-1] = ChainEntry(block.block_id)
    return AdapterChain(entries, new_blocks, deltas)
