"""Decode attention over paged KV in plain torch: the reference the Triton kernel is checked against.

Straightforward on purpose: gather every row's context through its slot table, compute scores in
fp32, mask what lies past the row's length or outside its sliding window, softmax, weighted sum.
It materialises [B, H, L] scores, so it is for tests, not for serving.
"""

from __future__ import annotations

import torch


def check_decode_shapes(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """Raise ValueError unless the arguments fit `paged_decode_attention`'s contract (no device sync)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got {tuple(q.shape)}")
    b, heads, dim = q.shape
    if key_cache.dim() != 3 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"key and value caches must both be [slots, KVH, D], got {tuple(key_cache.shape)}"
            f" and {tuple(value_cache.shape)}"
        )
    kv_heads = key_cache.shape[1]
    if key_cache.shape[2] != dim:
        raise ValueError(f"head_dim differs: q has {dim}, the caches {key_cache.shape[2]}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    if slots.dim() != 2 or slots.shape[0] != b:
        raise ValueError(f"slots must be [{b}, L], got {tuple(slots.shape)}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [{b}], got {tuple(lengths.shape)}")


def visible_keys(lengths: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """Bool [B, width]: key j of row b exists (j < length) and lies in the window (j > length-1-window)."""
    pos = torch.arange(width, device=lengths.device)[None, :]
    visible = pos < lengths[:, None]
    if window is not None:
        visible &= pos > (lengths[:, None] - 1 - window)
    return visible


def paged_decode_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention, one query token per row; same contract as `paged_decode_attention`.

    q [B, H, D]; key_cache, value_cache [num_slots, KVH, D] (any strides); slots [B, L] the slot of
    each row's context position (entries at or past the row's length are ignored); lengths [B].
    Returns [B, H, D] in q's dtype. A row with nothing visible (length 0) gives zeros.
    """
    check_decode_shapes(q, key_cache, value_cache, slots, lengths)
    b, heads, dim = q.shape
    kv_heads = key_cache.shape[1]
    width = slots.shape[1]
    visible = visible_keys(lengths.long(), width, window)  # [B, L]
    # Padding may hold any value: point it at slot 0 so the gather stays in bounds.
    safe = torch.where(visible, slots.long(), torch.zeros_like(slots, dtype=torch.long))
    keys = key_cache.float()[safe]  # [B, L, KVH, D]
    values = value_cache.float()[safe]
    q4 = q.float().view(b, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bkgd,blkd->bkgl", q4, keys) / dim**0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: nan -> 0
    out = torch.einsum("bkgl,blkd->bkgd", probs, values)
    return out.reshape(b, heads, dim).to(q.dtype)
