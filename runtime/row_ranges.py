"""Rows of a batch as sorted ranges, and the cheapest index for them: all rows, a slice, or a gather.

The executor orders a mixed batch's rows by chain, so the rows of one block (or one adapter) are
usually one contiguous range. A slice of a tensor is a view: running a block or a LoRA delta on
`x[start:end]` and writing into `out[start:end]` costs no gather or scatter. Only rows that stay
scattered (a chain with both decode rows and a prompt chunk in one step) fall back to an index.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Range = tuple[int, int]
# Rows of a tensor: None means every row; a slice is a view; a tensor of indices gathers.
Rows = slice | torch.Tensor | None


def coalesce(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, non-empty, merged where they touch or overlap."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def num_rows(ranges: list[Range]) -> int:
    return sum(end - start for start, end in ranges)


def as_rows(ranges: list[Range], total: int) -> Rows:
    """The index for coalesced `ranges` of a `total`-row tensor: None for all, a slice when contiguous."""
    if len(ranges) == 1:
        start, end = ranges[0]
        return None if (start, end) == (0, total) else slice(start, end)
    if not ranges:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([torch.arange(start, end) for start, end in ranges])


def localize(ranges: list[Range], within: list[Range]) -> list[Range]:
    """Where rows `ranges` sit in the rows `within` gathered in order (both coalesced).

    Rows of `ranges` outside `within` are dropped. The result is coalesced.
    """
    out: list[Range] = []
    offset = 0
    for w_start, w_end in within:
        for start, end in ranges:
            lo, hi = max(start, w_start), min(end, w_end)
            if lo < hi:
                out.append((offset + lo - w_start, offset + hi - w_start))
        offset += w_end - w_start
    return coalesce(out)


def split(ranges: list[Range], limit: int) -> list[list[Range]]:
    """`ranges` cut, in order, into parts of at most `limit` rows."""
    parts: list[list[Range]] = [[]]
    room = limit
    for start, end in ranges:
        while start < end:
            if room == 0:
                parts.append([])
                room = limit
            take = min(room, end - start)
            parts[-1].append((start, start + take))
            start += take
            room -= take
    return [p for p in parts if p]
