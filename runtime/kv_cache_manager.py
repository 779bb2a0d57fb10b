"""Page bookkeeping per request: allocation, prefix-cache hits and registration, freeing.

The manager only moves integer page ids around; the executor owns the physical KV tensors and
writes token `t` of a request into slot `page_table[t // page_size] * page_size + t % page_size`.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.page_pool import PagePool
from runtime.prefix_cache import PageHashFn, PageKey, PrefixCacheIndex, PrefixCacheStats, hash_page_key
from runtime.request import Request


class KVCacheExhaustedError(RuntimeError):
    """A request cannot get pages even with every other request preempted: the cache is too small."""


class KVCacheManager:
    """Hands out pages of a `PagePool` to requests and shares full pages through a prefix cache.

    Protocol (what the scheduler does):

    - `find_cached_prefix(request)` → `(pages, num_tokens)`: the longest verified run of cached full
      pages for the request's known tokens, at most `(num_tokens - 1) // page_size` pages so the
      last token is always computed. It takes no references.
    - `allocate(request, num_new_tokens, cached_pages)`: make `request.page_table` cover
      `num_computed_tokens + len(cached_pages) * page_size + num_new_tokens` tokens. Cached pages
      (only at admission, when the page table is empty) are referenced first and appended to the
      page table; the caller then advances `num_computed_tokens` by their length. Returns False
      and changes nothing if the free pages do not suffice. An admission allocation (empty page
      table, nothing computed) counts one prefix-cache query of `request.num_tokens` tokens.
    - `cache_full_pages(request, num_computed_tokens)` after the executor ran: registers pages that
      became full so later requests can hit them.
    - `free(request)`: drops the request's references (last page first, so a sequence's tail is
      evicted before its head) and clears its page table and per-request state.

    `hash_fn` exists so tests can force collisions; production uses blake2b-256.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        enable_prefix_caching: bool = True,
        hash_fn: PageHashFn = hash_page_key,
    ) -> None:
        self.pool = PagePool(num_pages, page_size)
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash_fn = hash_fn
        self._index = PrefixCacheIndex()
        self.prefix_stats = PrefixCacheStats()
        # Per request id: digests of its full pages computed so far, and how many pages are
        # registered. Kept here rather than on Request so the Request interface stays narrow.
        self._digests: dict[str, list[bytes]] = {}
        self._num_registered: dict[str, int] = {}

    # -- accounting --------------------------------------------------------------------------

    @property
    def num_total_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_free_pages(self) -> int:
        """Pages no request references (cached-but-evictable pages included)."""
        return self.pool.num_free_pages

    @property
    def num_used_pages(self) -> int:
        return self.pool.num_used_pages

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_cached_pages(self) -> int:
        return len(self._index)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_pages * self.page_size

    def ref_count(self, page_id: int) -> int:
        return self.pool.ref_count(page_id)

    def is_cached(self, page_id: int) -> bool:
        return self._index.is_cached(page_id)

    def num_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # -- prefix cache ------------------------------------------------------------------------

    def find_cached_prefix(self, request: Request) -> tuple[list[int], int]:
        if not self.enable_prefix_caching:
            return [], 0
        max_pages = (request.num_tokens - 1) // self.page_size
        digests = self._page_digests(request, max_pages)
        pages: list[int] = []
        for i in range(max_pages):
            page_id = self._index.lookup(digests[i], self._page_key(request, i, digests))
            if page_id is None:
                break
            pages.append(page_id)
        return pages, len(pages) * self.page_size

    def cache_full_pages(self, request: Request, num_computed_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        if num_computed_tokens > request.num_tokens:
            raise ValueError(
                f"request {request.request_id}: {num_computed_tokens} computed tokens but only"
                f" {request.num_tokens} known"
            )
        num_full = min(num_computed_tokens // self.page_size, len(request.page_table))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        digests = self._page_digests(request, num_full)
        for i in range(start, num_full):
            self._index.register(request.page_table[i], digests[i], self._page_key(request, i, digests))
        self._num_registered[request.request_id] = num_full

    # -- allocation --------------------------------------------------------------------------

    def num_new_pages_needed(self, request: Request, num_new_tokens: int, num_cached_pages: int = 0) -> int:
        total = request.num_computed_tokens + num_cached_pages * self.page_size + num_new_tokens
        have = len(request.page_table) + num_cached_pages
        return max(0, self.num_pages_for(total) - have)

    def can_allocate(self, request: Request, num_new_tokens: int, cached_pages: Sequence[int] = ()) -> bool:
        """Whether `allocate` with these arguments would succeed (it changes nothing)."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        admission = not request.page_table and request.num_computed_tokens == 0
        if cached_pages and not admission:
            raise ValueError(
                f"request {request.request_id}: cached pages can only be taken at admission"
                f" (page table has {len(request.page_table)} pages,"
                f" {request.num_computed_tokens} tokens computed)"
            )
        for page_id in cached_pages:
            if not self._index.is_cached(page_id):
                raise ValueError(f"page {page_id} is not in the prefix cache (evicted since lookup?)")
        num_new_pages = self.num_new_pages_needed(request, num_new_tokens, len(cached_pages))
        # Free cached pages we are about to reference stop being free, so they cannot count twice.
        num_revived = sum(1 for p in cached_pages if self.pool.is_free(p))
        return num_new_pages <= self.pool.num_free_pages - num_revived

    def allocate(self, request: Request, num_new_tokens: int, cached_pages: Sequence[int] = ()) -> bool:
        if not self.can_allocate(request, num_new_tokens, cached_pages):
            return False
        admission = not request.page_table and request.num_computed_tokens == 0
        num_new_pages = self.num_new_pages_needed(request, num_new_tokens, len(cached_pages))
        if admission and self.enable_prefix_caching:
            self.prefix_stats.queries += request.num_tokens
            self.prefix_stats.hits += len(cached_pages) * self.page_size
        for page_id in cached_pages:
            self.pool.acquire(page_id)
            request.page_table.append(page_id)
        for _ in range(num_new_pages):
            page_id = self.pool.pop_free()
            self._index.evict(page_id)
            request.page_table.append(page_id)
        return True

    def free(self, request: Request) -> None:
        for page_id in reversed(request.page_table):
            self.pool.release(page_id, keep=self._index.is_cached(page_id))
        request.page_table.clear()
        self._digests.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached page (e.g. after the executor's KV tensors were reinitialised)."""
        self._index.clear()

    # -- hashing -----------------------------------------------------------------------------

    def _page_key(self, request: Request, index: int, digests: list[bytes]) -> PageKey:
        start = index * self.page_size
        return PageKey(
            parent=digests[index - 1] if index else None,
            token_ids=tuple(request.tokens_slice(start, start + self.page_size)),
            salt=request.chain_digest,
            cache_salt=request.cache_salt,
        )

    def _page_digests(self, request: Request, num_pages: int) -> list[bytes]:
        """Digests of the request's first `num_pages` full pages, computed once and memoised."""
        digests = self._digests.setdefault(request.request_id, [])
        for i in range(len(digests), num_pages):
            digests.append(self._hash_fn(self._page_key(request, i, digests)))
        return digests
