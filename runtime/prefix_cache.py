"""Content addressing of full KV pages: chained page hashes and the verified digest → page index."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


class PageKey(NamedTuple):
    """Everything a full page's keys and values depend on.

    `parent` is the digest of the previous page of the sequence (None for the first page), so a
    page's identity covers the whole token prefix. `salt` is the request's chain digest: pages of
    different model chains must never be shared. `cache_salt` says who may share the page at all
    (the server sets it per tenant by default): a hit shows in a request's latency, so a page
    shared across tenants would let one time another's prompts (vLLM's `cache_salt`).
    """

    parent: bytes | None
    token_ids: tuple[int, ...]
    salt: bytes
    cache_salt: bytes = b""


PageHashFn = Callable[[PageKey], bytes]


def hash_page_key(key: PageKey) -> bytes:
    """blake2b-256 over a canonical, length-prefixed little-endian encoding of `key`."""
    h = hashlib.blake2b(digest_size=32)
    if key.parent is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01" + struct.pack("<Q", len(key.parent)) + key.parent)
    h.update(struct.pack("<Q", len(key.salt)) + key.salt)
    h.update(struct.pack("<Q", len(key.cache_salt)) + key.cache_salt)
    n = len(key.token_ids)
    h.update(struct.pack(f"<Q{n}q", n, *key.token_ids))
    return h.digest()


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups counted in tokens, as vLLM reports them."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class _CachedPage(NamedTuple):
    digest: bytes
    key: PageKey


class PrefixCacheIndex:
    """Maps page digests to the pages holding them, and pages back to their verified keys.

    A lookup hits only when the stored key equals the caller's key, so a digest collision (or a
    deliberately weak hash in tests) makes a miss, never a wrong page. One page per digest: a
    second page computed with the same content stays unregistered and is freed normally.
    """

    def __init__(self) -> None:
        self._by_digest: dict[bytes, int] = {}
        self._by_page: dict[int, _CachedPage] = {}

    def __len__(self) -> int:
        return len(self._by_page)

    def lookup(self, digest: bytes, key: PageKey) -> int | None:
        page_id = self._by_digest.get(digest)
        if page_id is None or self._by_page[page_id].key != key:
            return None
        return page_id

    def register(self, page_id: int, digest: bytes, key: PageKey) -> bool:
        """Record that `page_id` holds `key`; False if the page or the digest is already taken."""
        if page_id in self._by_page or digest in self._by_digest:
            return False
        self._by_digest[digest] = page_id
        self._by_page[page_id] = _CachedPage(digest, key)
        return True

    def evict(self, page_id: int) -> bool:
        """Forget what `page_id` holds (it is about to be overwritten); False if it held nothing."""
        entry = self._by_page.pop(page_id, None)
        if entry is None:
            return False
        del self._by_digest[entry.digest]
        return True

    def is_cached(self, page_id: int) -> bool:
        return page_id in self._by_page

    def clear(self) -> None:
        self._by_digest.clear()
        self._by_page.clear()
