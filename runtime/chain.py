"""A model as the runtime sees it: a chain of blocks `[embed, layer 0 … layer L-1, head]`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import torch

from runtime.blocks import EmbedBlock, HeadBlock, LayerBlock
from runtime.lora import LayerLora
from runtime.model_config import ModelConfig
from runtime.residency import BlockResidency, Loader
from runtime.rope import RotaryTable


class Chain:
    """The blocks of one model plus what every block needs to run (config, rotary tables).

    `digest` identifies the chain's content; the KV prefix cache mixes it into page hashes so
    requests of different models never share pages they should not. `layer_deltas[i]` is the
    low-rank delta (LoRA or a compressed fine-tune) added on top of layer block i, if any.
    """

    def __init__(
        self,
        config: ModelConfig,
        embed: EmbedBlock,
        layers: Sequence[LayerBlock],
        head: HeadBlock,
        rotary: RotaryTable,
        dtype: torch.dtype,
        digest: bytes,
        layer_deltas: list[LayerLora | None] | None = None,
    ) -> None:
        self.config = config
        self._embed = embed
        self._layers = list(layers)
        self._head = head
        self.rotary = rotary
        self.dtype = dtype
        self.digest = digest
        self.layer_deltas: list[LayerLora | None] = list(layer_deltas or [])
        # Chain digests h_0 … h_{L+1}, one per position, when the chain came from the zoo.
        self.prefix_digests: list[bytes] = []

    @property
    def embed(self) -> EmbedBlock:
        return self._embed

    @property
    def layers(self) -> Sequence[LayerBlock]:
        return self._layers

    @property
    def head(self) -> HeadBlock:
        return self._head

    def delta_for(self, index: int) -> LayerLora | None:
        return self.layer_deltas[index] if index < len(self.layer_deltas) else None

    def layer_prefix_digest(self, index: int) -> bytes:
        """What the KV of layer `index` depends on: the blocks embed, layer 0 … layer `index`.

        Zoo chains carry their chain digests `h_i` (`prefix_digests`, one per chain position), so
        two models whose chains agree up to layer i get the same digest and can share that layer's
        KV pages. Other chains only know their whole digest, so their layers never match another's.
        """
        if self.prefix_digests:
            return self.prefix_digests[index + 1]
        return hashlib.blake2b(self.digest + index.to_bytes(4, "little"), digest_size=32).digest()

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def block_keys(self) -> list[str]:
        """Identities of the chain's blocks (for grouping rows by block across chains)."""
        return [str(id(b)) for b in (self.embed, *self.layers, self.head)]

    def pin(self) -> None:
        """Make every block resident for one step (a no-op for chains held in memory)."""

    def unpin(self) -> None:
        """End of the step: the blocks may be evicted again."""

    def prefetch(self) -> None:
        """Ask for the blocks to be loaded in the background (no-op in memory)."""

    def is_resident(self) -> bool:
        """Whether a step could run this chain without loading a block."""
        return True

    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors: list[torch.Tensor] = []
        for block in (self.embed, *self.layers, self.head):
            tensors.extend(v for v in vars(block).values() if isinstance(v, torch.Tensor))
        for delta in self.layer_deltas:
            if delta is not None:
                tensors.extend(t for p in delta.projections.values() for t in (p.a, p.b))
        for value in tensors:
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
        return total


class _ResidentLayers(Sequence[LayerBlock]):
    def __init__(self, chain: ResidentChain) -> None:
        self._chain = chain

    def __len__(self) -> int:
        return self._chain.config.num_layers

    @overload
    def __getitem__(self, index: int) -> LayerBlock: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[LayerBlock]: ...

    def __getitem__(self, index: int | slice) -> LayerBlock | Sequence[LayerBlock]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        block: LayerBlock = self._chain.fetch(index + 1)
        return block

    def __iter__(self) -> Iterator[LayerBlock]:
        return (self[i] for i in range(len(self)))


class ResidentChain(Chain):
    """A chain whose blocks live in a `BlockResidency` under a weights budget, loaded on demand.

    `keys[p]` names the block at chain position p and `loaders[p]` loads it; chains that share a
    block share its key, so the block is resident (and executed) once for all of them.
    """

    def __init__(
        self,
        config: ModelConfig,
        keys: list[str],
        loaders: list[Callable[[], tuple[Any, int]]],
        residency: BlockResidency,
        rotary: RotaryTable,
        dtype: torch.dtype,
        digest: bytes,
        layer_deltas: list[LayerLora | None] | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.loaders = loaders
        self.residency = residency
        self.rotary = rotary
        self.dtype = dtype
        self.digest = digest
        self.layer_deltas = list(layer_deltas or [])
        self.prefix_digests = []
        self._layer_view = _ResidentLayers(self)

    def fetch(self, position: int) -> Any:
        return self.residency.get(self.keys[position], self.loaders[position])

    @property
    def embed(self) -> EmbedBlock:
        block: EmbedBlock = self.fetch(0)
        return block

    @property
    def layers(self) -> Sequence[LayerBlock]:
        return self._layer_view

    @property
    def head(self) -> HeadBlock:
        block: HeadBlock = self.fetch(len(self.keys) - 1)
        return block

    def block_keys(self) -> list[str]:
        return list(self.keys)

    def _items(self) -> list[tuple[str, Loader]]:
        return list(zip(self.keys, self.loaders, strict=True))

    def pin(self) -> None:
        self.residency.pin(self._items())

    def unpin(self) -> None:
        self.residency.unpin(self.keys)

    def prefetch(self) -> None:
        self.residency.prefetch(self._items())

    def is_resident(self) -> bool:
        resident = self.residency.resident_keys()
        return all(k in resident for k in self.keys)
