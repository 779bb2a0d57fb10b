"""BlockLLM's per-block batching: in a batch whose rows follow different chains, each distinct
block runs once on all the rows that use it.

At every chain position the rows are grouped by block object. Rows whose chains share a base
block but carry different deltas stay in one group: the base projection runs once for all of
them and each delta is added on its own segment of rows (see `DeltaGroups`). A bound on the
rows of one block execution (BlockLLM's per-block batch size) splits larger groups.

Rows are kept as ranges: the executor orders a mixed batch by chain, so a group's or an
adapter's rows are usually one slice (a view) rather than a gather (see runtime/row_ranges.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from runtime.blocks import EmbedBlock, HeadBlock, LayerBlock
from runtime.chain import Chain
from runtime.lora import DeltaGroups, LayerLora
from runtime.rope import RotaryTable
from runtime.row_ranges import Range, Rows, as_rows, coalesce, localize, num_rows, split


class LayerGroup(NamedTuple):
    """One execution of one layer block: its rows (None = every row of the batch) and their deltas."""

    block: LayerBlock
    rows: Rows
    deltas: DeltaGroups


class BatchPlan:
    """Which rows run which blocks in one step; built once per step from the rows' chains."""

    def __init__(
        self, segments: list[tuple[Chain, int, int]], num_rows: int, max_block_rows: int | None
    ) -> None:
        self.num_rows = num_rows
        self.max_block_rows = max_block_rows
        self.chains: list[Chain] = []
        index: dict[int, int] = {}
        owner = torch.empty(num_rows, dtype=torch.int64)
        ranges: list[list[Range]] = []
        for chain, start, end in segments:
            i = index.get(id(chain))
            if i is None:
                i = index[id(chain)] = len(self.chains)
                self.chains.append(chain)
                ranges.append([])
            ranges[i].append((start, end))
            owner[start:end] = i
        self.owner = owner
        self.ranges = [coalesce(r) for r in ranges]

    def _grouped(self, keys: list[int]) -> list[tuple[int, list[int]]]:
        """Chain indices grouped by key, in first-seen order."""
        groups: dict[int, list[int]] = {}
        for chain_index, key in enumerate(keys):
            groups.setdefault(key, []).append(chain_index)
        return list(groups.items())

    def _ranges_of(self, chain_indices: list[int]) -> list[Range]:
        if len(chain_indices) == len(self.chains):
            return [(0, self.num_rows)]
        return coalesce(r for i in chain_indices for r in self.ranges[i])

    def _rows_of(self, chain_indices: list[int]) -> Rows:
        return as_rows(self._ranges_of(chain_indices), self.num_rows)

    def _split(self, ranges: list[Range]) -> list[list[Range]]:
        limit = self.max_block_rows
        if limit is None or num_rows(ranges) <= limit:
            return [ranges]
        return split(ranges, limit)

    def embed_groups(self) -> list[tuple[EmbedBlock, Rows]]:
        groups = self._grouped([id(c.embed) for c in self.chains])
        return [(self.chains[ids[0]].embed, self._rows_of(ids)) for _, ids in groups]

    def rope_groups(self) -> list[tuple[RotaryTable, Rows]]:
        # Chains of one base share their rope; a fine-tune with its own rope gets its own tables.
        groups = self._grouped([hash(c.config.rope) for c in self.chains])
        return [(self.chains[ids[0]].rotary, self._rows_of(ids)) for _, ids in groups]

    def layer_groups(self, position: int) -> list[LayerGroup]:
        out: list[LayerGroup] = []
        for _, ids in self._grouped([id(c.layers[position]) for c in self.chains]):
            block = self.chains[ids[0]].layers[position]
            for part in self._split(self._ranges_of(ids)):
                out.append(LayerGroup(block, as_rows(part, self.num_rows), self._deltas(ids, position, part)))
        return out

    def _deltas(self, chain_ids: list[int], position: int, part: list[Range]) -> DeltaGroups:
        """Delta segments for the rows `part` of one group, as positions within those rows."""
        loras: dict[int, tuple[LayerLora, list[int]]] = {}
        for i in chain_ids:
            lora = self.chains[i].delta_for(position)
            if lora is not None:
                loras.setdefault(id(lora), (lora, []))[1].append(i)
        total = num_rows(part)
        segments: list[tuple[LayerLora, Rows]] = []
        for lora, users in loras.values():
            local = localize(self._ranges_of(users), part)
            if local:
                segments.append((lora, as_rows(local, total)))
        return DeltaGroups(segments)

    def head_groups(self, sample_rows: torch.Tensor) -> list[tuple[HeadBlock, torch.Tensor | None]]:
        """Head executions over the sampled rows; indices are positions in `sample_rows`."""
        owners = self.owner.index_select(0, sample_rows)
        out: list[tuple[HeadBlock, torch.Tensor | None]] = []
        for _, ids in self._grouped([id(c.head) for c in self.chains]):
            if len(ids) == len(self.chains):
                out.append((self.chains[ids[0]].head, None))
                continue
            mask = torch.zeros_like(owners, dtype=torch.bool)
            for i in ids:
                mask |= owners == i
            out.append((self.chains[ids[0]].head, mask.nonzero().flatten()))
        return out
