"""KV segments: layer ranges whose KV pages are shared across models whose chains agree that far.

The KV of layer i depends only on the blocks embed, layer 0 … layer i, which the chain digest
`h_i` names (DESIGN.md). A base model and a fine-tune of its top layers therefore compute the same
KV in their lower layers for the same prompt prefix. The engine cuts its layers into segments where
the models it serves diverge; each segment has its own page pool, prefix-cache index and, per
request, its own page table, and a segment's pages are salted with `h` of its last layer. Requests
of different models then share a segment's pages for a common prefix exactly when their chains
agree through that segment.

A request's computation starts where the shortest of its segments' cached prefixes ends. A segment
whose cached prefix reaches further holds those positions already: the executor recomputes them (the
hidden states are needed by the layers above) but must not write them again, since other requests
read those pages. `Request.kv_write_floors` carries that per segment.

Each segment's pool has the same number of pages as one whole-model pool would, so the KV memory is
unchanged; what sharing saves shows as fewer pages in use in the lower segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from runtime.chain import Chain
from runtime.kv_cache_manager import KVCacheManager
from runtime.prefix_cache import PageHashFn, PrefixCacheStats, hash_page_key
from runtime.request import Request


class KVSegments(NamedTuple):
    """Layer boundaries `(0, b_1, …, num_layers)`: segment g holds layers [bounds[g], bounds[g+1])."""

    bounds: tuple[int, ...]

    @classmethod
    def whole(cls, num_layers: int) -> KVSegments:
        return cls((0, num_layers))

    @classmethod
    def cut_at(cls, num_layers: int, cuts: Iterable[int]) -> KVSegments:
        inner = sorted({c for c in cuts if 0 < c < num_layers})
        return cls((0, *inner, num_layers))

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:], strict=True))

    @property
    def num_segments(self) -> int:
        return len(self.bounds) - 1

    def layer_segments(self) -> list[int]:
        """For each layer, the index of its segment."""
        return [g for g, (a, b) in enumerate(self.ranges) for _ in range(a, b)]

    def salts(self, chain: Chain) -> list[bytes]:
        """Each segment's prefix-cache salt for requests of `chain`: `h` of its last layer."""
        return [chain.layer_prefix_digest(end - 1) for _, end in self.ranges]


class _SegmentView:
    """One request as one segment's `KVCacheManager` sees it: its page table and salt there."""

    __slots__ = ("cache_salt", "chain_digest", "page_table", "request")

    def __init__(self, request: Request, page_table: list[int], salt: bytes) -> None:
        self.request = request
        self.page_table = page_table
        self.chain_digest = salt
        self.cache_salt = request.cache_salt

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return self.request.num_tokens

    @property
    def num_computed_tokens(self) -> int:
        return self.request.num_computed_tokens

    def tokens_slice(self, start: int, end: int) -> list[int]:
        return self.request.tokens_slice(start, end)


class SegmentPrefix(NamedTuple):
    """What `find_cached_prefix` found: each segment's cached pages."""

    pages: list[list[int]]


@dataclass
class SegmentSharing:
    """Per segment: prompt tokens looked up at admission and tokens found in the cache there."""

    queries: list[int] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)
    # Tokens found in a segment beyond where the request's computation starts: KV another
    # model's request wrote and this one reuses although it differs in higher layers.
    shared_beyond_start: list[int] = field(default_factory=list)


class SegmentedKVCacheManager:
    """One `KVCacheManager` per KV segment behind the interface of one (see `PageAllocator`)."""

    def __init__(
        self,
        segments: KVSegments,
        num_pages: int,
        page_size: int,
        enable_prefix_caching: bool = True,
        hash_fn: PageHashFn = hash_page_key,
    ) -> None:
        self.segments = segments
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.managers = [
            KVCacheManager(num_pages, page_size, enable_prefix_caching, hash_fn)
            for _ in range(segments.num_segments)
        ]
        # Whole-model figures: prompt tokens whose computation the cache saved.
        self.prefix_stats = PrefixCacheStats()
        n = segments.num_segments
        self.sharing = SegmentSharing([0] * n, [0] * n, [0] * n)

    # -- accounting (the busiest segment is what limits admission) -----------------------------

    @property
    def num_segments(self) -> int:
        return self.segments.num_segments

    @property
    def capacity_tokens(self) -> int:
        return self.managers[0].capacity_tokens

    @property
    def num_total_pages(self) -> int:
        return self.managers[0].num_total_pages

    @property
    def num_free_pages(self) -> int:
        return min(m.num_free_pages for m in self.managers)

    @property
    def usage(self) -> float:
        return max(m.usage for m in self.managers)

    def segment_used_pages(self) -> list[int]:
        return [m.num_used_pages for m in self.managers]

    def num_pages_for(self, num_tokens: int) -> int:
        return self.managers[0].num_pages_for(num_tokens)

    # -- the PageAllocator protocol --------------------------------------------------------------

    def _views(self, request: Request) -> list[Any]:
        n = self.num_segments
        if len(request.page_tables) != n:
            if any(request.page_tables):
                raise ValueError(f"request {request.request_id} holds pages of another segment layout")
            request.page_tables = [[] for _ in range(n)]
        if n == 1 and request.segment_salts is None:
            return [request]
        salts = request.segment_salts or [request.chain_digest] * n
        return [_SegmentView(request, request.page_tables[g], salts[g]) for g in range(n)]

    def find_cached_prefix(self, request: Request) -> tuple[SegmentPrefix, int]:
        found = [m.find_cached_prefix(v) for m, v in zip(self.managers, self._views(request), strict=True)]
        return SegmentPrefix([pages for pages, _ in found]), min(tokens for _, tokens in found)

    def allocate(self, request: Request, num_new_tokens: int, cached_pages: Any = ()) -> bool:
        views = self._views(request)
        admission = not any(request.page_tables) and request.num_computed_tokens == 0
        per_segment: Sequence[Sequence[int]] = (
            cached_pages.pages if isinstance(cached_pages, SegmentPrefix) else [()] * len(views)
        )
        start = min((len(p) * self.page_size for p in per_segment), default=0)
        # A segment whose cached prefix reaches past `start` needs pages only past its own prefix.
        new_tokens = [max(0, start + num_new_tokens - len(p) * self.page_size) for p in per_segment]
        plans = list(zip(self.managers, views, new_tokens, per_segment, strict=True))
        if not all(m.can_allocate(v, n, p) for m, v, n, p in plans):
            return False
        for m, v, n, p in plans:
            if not m.allocate(v, n, p):
                raise RuntimeError("segment allocation failed after can_allocate agreed")
        if admission and self.enable_prefix_caching:
            self.prefix_stats.queries += request.num_tokens
            self.prefix_stats.hits += start
            for g, pages in enumerate(per_segment):
                self.sharing.queries[g] += request.num_tokens
                self.sharing.hits[g] += len(pages) * self.page_size
                self.sharing.shared_beyond_start[g] += len(pages) * self.page_size - start
        floors = [len(p) * self.page_size for p in per_segment]
        request.kv_write_floors = floors if admission and max(floors, default=0) > start else None
        return True

    def cache_full_pages(self, request: Request, num_computed_tokens: int) -> None:
        for m, v in zip(self.managers, self._views(request), strict=True):
            m.cache_full_pages(v, num_computed_tokens)

    def free(self, request: Request) -> None:
        for m, v in zip(self.managers, self._views(request), strict=True):
            m.free(v)
        request.kv_write_floors = None

    def reset_prefix_cache(self) -> None:
        for m in self.managers:
            m.reset_prefix_cache()
