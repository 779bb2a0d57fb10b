"""Assembling a runtime Chain from block ids in the store, and the chain digests that key KV sharing.

The digest follows DESIGN.md: `h_0 = H(entry_0)`, `h_i = H(h_{i-1}, entry_i)`, where an entry is a
block id plus its delta ids. Two chains that agree on entries 0..i agree on h_0..h_i, which is what
lets models that share their lower blocks share the KV of those layers.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import torch

from runtime.chain import Chain
from runtime.checkpoint_loader import build_chain
from runtime.errors import ModelLoadError
from runtime.model_config import ModelConfig
from runtime.residency import BlockResidency
from zoo.block_store import BlockStore
from zoo.blocks import BlockData, BlockKind, check_content_id, fields_for
from zoo.deltas import layer_lora
from zoo.resident_blocks import resident_chain


class ChainAssemblyError(ModelLoadError):
    """The block ids do not form a chain for the given config (count, kinds or architecture fields)."""


class ChainEntry(NamedTuple):
    """One chain position: a block and the deltas applied on top of it, in order."""

    block_id: str
    delta_ids: tuple[str, ...] = ()


def _entry_bytes(entry: ChainEntry) -> bytes:
    # Ids are fixed-size digests, so the raw bytes plus a delta count are unambiguous.
    parts = [bytes.fromhex(check_content_id(entry.block_id)), len(entry.delta_ids).to_bytes(4, "little")]
    parts.extend(bytes.fromhex(check_content_id(d)) for d in entry.delta_ids)
    return b"".join(parts)


def chain_digests(entries: list[ChainEntry]) -> list[bytes]:
    """`[h_0, …, h_{n-1}]`: each position's digest covers that entry and every entry before it."""
    digests: list[bytes] = []
    for entry in entries:
        h = hashlib.sha256()
        if digests:
            h.update(digests[-1])
        h.update(_entry_bytes(entry))
        digests.append(h.digest())
    return digests


def expected_kind(position: int, num_layers: int) -> BlockKind:
    """The block kind at `position` of a chain `[embed, layer 0 … layer L-1, head]`."""
    if position == 0:
        return "embed"
    return "head" if position == num_layers + 1 else "layer"


def check_block_fits(block: BlockData, config: ModelConfig, position: int) -> None:
    """Raise ChainAssemblyError unless `block` has the kind and architecture fields `config` needs there."""
    kind = expected_kind(position, config.num_layers)
    where = f"chain position {position} (block {block.block_id})"
    if block.kind != kind:
        raise ChainAssemblyError(f"{where}: expected a block of kind {kind!r}, got {block.kind!r}")
    tied = bool(block.fields.get("tied")) if kind == "head" else None
    # A head may be tied although the config is not: the checkpoint had no lm_head, as the runtime allows.
    expected = fields_for(kind, config, position - 1 if kind == "layer" else None, tied=tied)
    # How a layer's weights are stored (dense or 4-bit) is not architecture: any chain may use either.
    fields = {k: v for k, v in block.fields.items() if k != "quantization"}
    if fields != expected:
        diff = sorted(k for k in expected.keys() | fields.keys() if fields.get(k) != expected.get(k))
        detail = ", ".join(
            f"{k}: block has {fields.get(k)!r}, config needs {expected.get(k)!r}" for k in diff
        )
        raise ChainAssemblyError(f"{where} does not fit the config: {detail}")


def load_chain(
    store: BlockStore,
    block_ids: list[str],
    raw_config: dict[str, Any],
    dtype: torch.dtype,
    verify: bool = False,
) -> Chain:
    """Load `[embed, layer 0 … layer L-1, head]` from the store (memory-mapped) into a runtime Chain."""
    return load_chain_entries(store, [ChainEntry(b) for b in block_ids], raw_config, dtype, verify)


def load_chain_entries(
    store: BlockStore,
    entries: list[ChainEntry],
    raw_config: dict[str, Any],
    dtype: torch.dtype,
    verify: bool = False,
    residency: BlockResidency | None = None,
) -> Chain:
    """Load a chain whose layer entries may carry deltas (LoRA, compressed fine-tunes).

    `verify` rehashes every block and delta. The chain's digest is the last chain digest.
    """
    config = ModelConfig.from_hf_dict(raw_config)
    if len(entries) != config.num_layers + 2:
        raise ChainAssemblyError(
            f"a {config.num_layers}-layer model needs {config.num_layers + 2} chain entries, got {len(entries)}"
        )
    blocks = [store.load(e.block_id, verify=verify) for e in entries]
    for position, block in enumerate(blocks):
        check_block_fits(block, config, position)
    for position, entry in enumerate(entries):
        if entry.delta_ids and expected_kind(position, config.num_layers) != "layer":
            raise ChainAssemblyError(f"chain position {position}: deltas are only allowed on layer blocks")
    prefix_digests = chain_digests(entries)
    digest = prefix_digests[-1]
    deltas = [
        layer_lora([store.load_delta(d, verify=verify) for d in e.delta_ids], dtype) for e in entries[1:-1]
    ]
    if residency is not None:
        resident = resident_chain(store, entries, config, dtype, digest, deltas, residency)
        resident.prefix_digests = prefix_digests
        return resident
    chain = build_chain(
        config,
        blocks[0].tensors,
        [b.tensors for b in blocks[1:-1]],
        blocks[-1].tensors,
        dtype,
        digest,
    )
    chain.layer_deltas = deltas
    chain.prefix_digests = prefix_digests
    return chain
