"""What the scheduler needs of the KV page bookkeeping, whether one pool or one per KV segment."""

from __future__ import annotations

from typing import Any, Protocol

from runtime.prefix_cache import PrefixCacheStats
from runtime.request import Request


class PageAllocator(Protocol):
    """Pages for requests, shared through a prefix cache (see `KVCacheManager` for the protocol).

    `find_cached_prefix` returns an opaque handle of cached pages plus how many tokens they save;
    the scheduler hands the handle back to `allocate` unchanged.
    """

    page_size: int
    enable_prefix_caching: bool
    prefix_stats: PrefixCacheStats

    @property
    def capacity_tokens(self) -> int: ...

    @property
    def num_total_pages(self) -> int: ...

    @property
    def num_free_pages(self) -> int: ...

    @property
    def usage(self) -> float: ...

    def find_cached_prefix(self, request: Request) -> tuple[Any, int]: ...

    def allocate(self, request: Request, num_new_tokens: int, cached_pages: Any = ()) -> bool: ...

    def cache_full_pages(self, request: Request, num_computed_tokens: int) -> None: ...

    def free(self, request: Request) -> None: ...
