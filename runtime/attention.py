"""Attention over paged KV, in torch: the CPU path and the reference for the GPU kernels.

The batch is laid out decode rows first (one query token each), then prompt chunks. Decode rows
are attended in one padded SDPA call: their pages are gathered through a slot index built once
per step and shared by all layers. Each prompt chunk is attended on its own, causally, against
its cached context plus itself.

KV storage is head-major (see `LayerKV`): gathering slots then yields, for every KV head, one
contiguous [length, head_dim] block per sequence, the layout SDPA reads fastest, so the gather is
the only copy and no transpose is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LayerKV(NamedTuple):
    """One layer's physical KV tensors, each [num_pages * page_size, num_kv_heads, head_dim].

    Both are views of head-major storage ([num_kv_heads, slots, head_dim], see `new_layer_kv`);
    any other layout still gives the same results, only gathers get slower.
    """

    key: torch.Tensor
    value: torch.Tensor


def new_layer_kv(num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> LayerKV:
    """Zeroed KV of `num_slots` slots in the head-major layout the attention gathers from."""
    shape = (num_kv_heads, num_slots, head_dim)
    return LayerKV(
        torch.zeros(shape, dtype=dtype).permute(1, 0, 2),
        torch.zeros(shape, dtype=dtype).permute(1, 0, 2),
    )


def _gather_heads(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows `slots` (1-D) of a [slots, heads, dim] cache, returned as [heads, len(slots), dim]."""
    return cache.permute(1, 0, 2).index_select(1, slots)


class PrefillSpan(NamedTuple):
    """A prompt chunk's rows [row_start, row_start + num_rows) and where its context lives.

    `context_slots` holds the cache slots of every token the chunk attends to (the cached prefix
    and the chunk itself); it is None when the chunk is the whole context, so attention can use
    the freshly computed keys directly.
    """

    row_start: int
    num_rows: int
    start_position: int
    context_slots: torch.Tensor | None


# One more padded decode group costs about as much per layer (a few extra op launches) as
# gathering and attending this many extra KV slots; measured on a 2-core AVX-512 CPU, fp32.
DECODE_GROUP_COST_SLOTS = 96
# Group boundaries are considered only every `n // DECODE_GROUP_CANDIDATES` rows: planning stays
# O(1) per step while the padding saved is nearly that of the exact optimum.
DECODE_GROUP_CANDIDATES = 16


class DecodeGroup(NamedTuple):
    """Decode rows of similar context length, attended in one SDPA call padded to `length`.

    `rows` are positions among the decode rows (None: all of them, in order); `slots` is the
    flat [num_rows * length] slot index of their contexts; `lengths` their true lengths.
    """

    rows: torch.Tensor | None
    num_rows: int
    length: int
    slots: torch.Tensor
    lengths: torch.Tensor


def split_sorted_lengths(
    lengths: list[int], group_cost: int = DECODE_GROUP_COST_SLOTS
) -> list[tuple[int, int]]:
    """Cut descending `lengths` into ranges [start, end) minimising padded slots + group_cost each.

    A group is padded to its first (longest) row. Dynamic programming over candidate cut points.
    """
    n = len(lengths)
    stride = max(1, n // DECODE_GROUP_CANDIDATES)
    cuts = [*range(0, n, stride), n]
    best = [0] * len(cuts)
    prev = [0] * len(cuts)
    for i in range(1, len(cuts)):
        end = cuts[i]
        best[i], prev[i] = min(
            (best[j] + (end - cuts[j]) * lengths[cuts[j]] + group_cost, j) for j in range(i)
        )
    ranges: list[tuple[int, int]] = []
    i = len(cuts) - 1
    while i > 0:
        ranges.append((cuts[prev[i]], cuts[i]))
        i = prev[i]
    return ranges[::-1]


def plan_decode_groups(decode_slots: torch.Tensor, decode_lengths: torch.Tensor) -> list[DecodeGroup]:
    """Group decode rows by context length so short contexts are not padded to the longest one."""
    b, width = decode_slots.shape
    lengths: list[int] = decode_lengths.tolist()
    order = sorted(range(b), key=lambda r: -lengths[r])
    ranges = split_sorted_lengths([lengths[r] for r in order])
    if len(ranges) <= 1:
        return [DecodeGroup(None, b, width, decode_slots.reshape(-1), decode_lengths)]
    groups = []
    for start, end in ranges:
        rows = torch.tensor(order[start:end], dtype=torch.int64)
        length = lengths[order[start]]
        slots = decode_slots.index_select(0, rows)[:, :length].reshape(-1)
        groups.append(DecodeGroup(rows, end - start, length, slots, decode_lengths.index_select(0, rows)))
    return groups


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, built once by the executor and shared by every layer.

    `decode_slots` [B, L] holds each decode row's context slots, padded to the longest; the
    decode groups and their masks are derived from it on first use and reused by every layer.
    """

    slot_mapping: torch.Tensor
    num_decode_rows: int
    decode_slots: torch.Tensor
    decode_positions: torch.Tensor
    decode_lengths: torch.Tensor
    prefills: list[PrefillSpan]
    # Rows whose keys and values are written (to `slot_mapping`, in order); None means every row.
    # Rows left out hold positions this layer's pages already have, shared with other requests.
    write_rows: torch.Tensor | None = None
    _decode_groups: list[DecodeGroup] | None = None
    _decode_masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)

    def decode_groups(self) -> list[DecodeGroup]:
        if self._decode_groups is None:
            self._decode_groups = plan_decode_groups(self.decode_slots, self.decode_lengths)
        return self._decode_groups

    def decode_mask(self, index: int, window: int | None) -> torch.Tensor:
        """Bool mask [n, 1, 1, L] of group `index`: key j is visible if it exists and is in the window."""
        mask = self._decode_masks.get((index, window))
        if mask is None:
            group = self.decode_groups()[index]
            key_pos = torch.arange(group.length)
            visible = key_pos[None, :] < group.lengths[:, None]
            if window is not None:
                visible &= key_pos[None, :] > (group.lengths[:, None] - 1 - window)
            mask = visible[:, None, None, :]
            self._decode_masks[(index, window)] = mask
        return mask


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv: LayerKV,
    sliding_window: int | None,
) -> torch.Tensor:
    """Write this step's k/v into the pages, then attend. q: [T, H, D]; k, v: [T, KVH, D]."""
    if meta.write_rows is None:
        kv.key.index_copy_(0, meta.slot_mapping, k)
        kv.value.index_copy_(0, meta.slot_mapping, v)
    else:
        kv.key.index_copy_(0, meta.slot_mapping, k.index_select(0, meta.write_rows))
        kv.value.index_copy_(0, meta.slot_mapping, v.index_select(0, meta.write_rows))
    nd = meta.num_decode_rows
    if nd == q.shape[0]:  # a decode-only step: its one attention call is the whole output
        return _decode_attention(q, meta, kv, sliding_window)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode_attention(q[:nd], meta, kv, sliding_window)
    for span in meta.prefills:
        rows = slice(span.row_start, span.row_start + span.num_rows)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], span, kv, sliding_window)
    return out


def _decode_attention(
    q: torch.Tensor, meta: AttentionMetadata, kv: LayerKV, window: int | None
) -> torch.Tensor:
    if q.is_cuda:
        # The Triton kernel reads each row's own length through the slot table: no groups, no padding.
        from kernels.paged_attention_triton import paged_decode_attention  # triton only where it runs

        slots = meta.decode_slots.to(q.device, non_blocking=True)
        lengths = meta.decode_lengths.to(q.device, non_blocking=True)
        return paged_decode_attention(q, kv.key, kv.value, slots, lengths, window)
    groups = meta.decode_groups()
    if len(groups) == 1:
        return _decode_group_attention(q, groups[0], meta.decode_mask(0, window), kv)
    out = torch.empty_like(q)
    for i, group in enumerate(groups):
        if group.rows is None:
            raise ValueError("a decode group of a split batch must name its rows")
        part = _decode_group_attention(q.index_select(0, group.rows), group, meta.decode_mask(i, window), kv)
        out.index_copy_(0, group.rows, part)
    return out


def _decode_group_attention(
    q: torch.Tensor, group: DecodeGroup, mask: torch.Tensor, kv: LayerKV
) -> torch.Tensor:
    b, heads, dim = q.shape
    kv_heads = kv.key.shape[1]
    # Fold the query heads of one KV group into the query-length axis: GQA without repeating K/V.
    q4 = q.view(b, kv_heads, heads // kv_heads, dim)
    # [kv_heads, b, length, dim] seen as [b, kv_heads, length, dim]: each (row, head) is contiguous.
    keys = _gather_heads(kv.key, group.slots).view(kv_heads, b, group.length, dim).transpose(0, 1)
    values = _gather_heads(kv.value, group.slots).view(kv_heads, b, group.length, dim).transpose(0, 1)
    out = F.scaled_dot_product_attention(q4, keys, values, attn_mask=mask)
    return out.reshape(b, heads, dim)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    span: PrefillSpan,
    kv: LayerKV,
    window: int | None,
) -> torch.Tensor:
    n = q.shape[0]
    if span.context_slots is None:
        keys, values = k.transpose(0, 1), v.transpose(0, 1)
    else:
        keys = _gather_heads(kv.key, span.context_slots)
        values = _gather_heads(kv.value, span.context_slots)
    ctx = keys.shape[1]
    q_pos = torch.arange(span.start_position, span.start_position + n)
    mask: torch.Tensor | None = None
    causal = span.context_slots is None and window is None
    if not causal:
        key_pos = torch.arange(span.start_position + n - ctx, span.start_position + n)
        visible = key_pos[None, :] <= q_pos[:, None]
        if window is not None:
            visible &= key_pos[None, :] > (q_pos[:, None] - window)
        mask = visible
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys[None],
        values[None],
        attn_mask=mask,
        is_causal=causal,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)
