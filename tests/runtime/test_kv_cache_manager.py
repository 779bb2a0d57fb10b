"""Page pool, prefix cache and KV cache manager bookkeeping (no tensors involved)."""

from __future__ import annotations

import random
import time

import pytest

from runtime.kv_cache_manager import KVCacheManager
from runtime.page_pool import PagePool, PagePoolError
from runtime.prefix_cache import PageKey, hash_page_key
from runtime.request import Request
from runtime.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], salt: bytes = b"chain-a") -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), chain_digest=salt)


def compute(kv: KVCacheManager, request: Request) -> None:
    """Admit `request` with its prefix hits and 'compute' all its known tokens, as the scheduler would."""
    pages, num_cached = kv.find_cached_prefix(request)
    if not kv.allocate(request, request.num_tokens - num_cached, pages):
        raise RuntimeError("test setup: pool too small")
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_pages(request, request.num_computed_tokens)


# -- page pool ----------------------------------------------------------------------------------


def test_pool_takes_from_head_and_returns_to_tail_or_head() -> None:
    pool = PagePool(num_pages=4, page_size=2)
    taken = [pool.pop_free() for _ in range(3)]
    assert taken == [0, 1, 2]
    assert pool.free_page_ids() == [3]
    pool.release(1)
    pool.release(0)
    assert pool.free_page_ids() == [3, 1, 0]
    pool.release(2, keep=False)
    assert pool.free_page_ids() == [2, 3, 1, 0]
    assert pool.peek_free() == 2


def test_pool_acquire_pulls_page_from_middle_of_free_queue() -> None:
    pool = PagePool(num_pages=5, page_size=2)
    pool.acquire(2)
    assert pool.free_page_ids() == [0, 1, 3, 4]
    assert pool.ref_count(2) == 1
    assert pool.num_free_pages == 4


def test_pool_reference_counts() -> None:
    pool = PagePool(num_pages=2, page_size=2)
    page = pool.pop_free()
    pool.acquire(page)
    assert pool.ref_count(page) == 2
    pool.release(page)
    assert not pool.is_free(page)
    assert page not in pool.free_page_ids()
    pool.release(page)
    assert pool.is_free(page)
    with pytest.raises(PagePoolError, match="released more often"):
        pool.release(page)
    with pytest.raises(PagePoolError, match="outside"):
        pool.acquire(7)


def test_pool_exhaustion_and_usage() -> None:
    pool = PagePool(num_pages=4, page_size=8)
    assert (pool.num_free_pages, pool.num_used_pages, pool.usage) == (4, 0, 0.0)
    pool.pop_free()
    assert (pool.num_free_pages, pool.num_used_pages, pool.usage) == (3, 1, 0.25)
    for _ in range(3):
        pool.pop_free()
    assert pool.usage == 1.0
    with pytest.raises(PagePoolError, match="no free page"):
        pool.pop_free()


def test_pool_operations_do_not_scale_with_pool_size() -> None:
    # With a list and list.remove this is ~10^10 element moves; with O(1) operations, well under a second.
    n = 200_000
    pool = PagePool(num_pages=n, page_size=16)
    order = list(range(n))
    random.Random(0).shuffle(order)
    start = time.perf_counter()
    for page in order:
        pool.acquire(page)
    assert pool.num_free_pages == 0
    for page in reversed(order):
        pool.release(page)
    elapsed = time.perf_counter() - start
    assert pool.free_page_ids() == order[::-1]
    assert elapsed < 5.0


# -- hashing ------------------------------------------------------------------------------------


def test_page_hash_covers_parent_tokens_and_salt() -> None:
    base = PageKey(parent=None, token_ids=(1, 2, 3), salt=b"s")
    digests = {
        hash_page_key(base),
        hash_page_key(base._replace(parent=hash_page_key(base))),
        hash_page_key(base._replace(token_ids=(1, 2, 4))),
        hash_page_key(base._replace(token_ids=(1, 2))),
        hash_page_key(base._replace(token_ids=(1, 2, 3, 0))),
        hash_page_key(base._replace(salt=b"t")),
        hash_page_key(base._replace(salt=b"")),
        # Length prefixes keep the salt/token boundary unambiguous.
        hash_page_key(PageKey(None, (1, 2, 3), b"s\x01")),
    }
    assert len(digests) == 8
    assert hash_page_key(base) == hash_page_key(PageKey(None, (1, 2, 3), b"s"))
    assert len(hash_page_key(base)) == 32


# -- allocation ---------------------------------------------------------------------------------


def test_allocate_covers_computed_plus_new_tokens() -> None:
    kv = KVCacheManager(num_pages=8, page_size=4)
    req = make_request("a", list(range(20)))
    assert kv.allocate(req, 10)
    assert len(req.page_table) == 3
    req.num_computed_tokens = 10
    assert kv.allocate(req, 2)
    assert len(req.page_table) == 3
    assert kv.allocate(req, 3)
    assert len(req.page_table) == 4
    assert kv.num_free_pages == 4
    assert kv.usage == 0.5


def test_failed_allocate_changes_nothing() -> None:
    kv = KVCacheManager(num_pages=3, page_size=4)
    a = make_request("a", list(range(8)))
    b = make_request("b", list(range(100, 108)))
    assert kv.allocate(a, 8)
    assert not kv.allocate(b, 8)
    assert b.page_table == []
    assert kv.num_free_pages == 1
    assert kv.prefix_stats.queries == 8


def test_free_returns_every_page_and_clears_table() -> None:
    kv = KVCacheManager(num_pages=6, page_size=4)
    reqs = [make_request(str(i), [i] * 9) for i in range(2)]
    for r in reqs:
        compute(kv, r)
    assert kv.num_free_pages == 0
    for r in reqs:
        kv.free(r)
        assert r.page_table == []
    assert kv.num_free_pages == kv.num_total_pages


# -- prefix cache -------------------------------------------------------------------------------


def test_prefix_hit_shares_full_pages_and_counts_tokens() -> None:
    kv = KVCacheManager(num_pages=10, page_size=4)
    a = make_request("a", list(range(10)))
    compute(kv, a)
    b = make_request("b", [*range(8), 99, 98, 97])
    pages, num_tokens = kv.find_cached_prefix(b)
    assert pages == a.page_table[:2]
    assert num_tokens == 8
    assert kv.allocate(b, b.num_tokens - num_tokens, pages)
    assert b.page_table[:2] == a.page_table[:2]
    assert b.page_table[2] not in a.page_table
    assert [kv.ref_count(p) for p in a.page_table] == [2, 2, 1]
    assert (kv.prefix_stats.queries, kv.prefix_stats.hits) == (10 + 11, 8)
    assert kv.prefix_stats.hit_rate == pytest.approx(8 / 21)


def test_last_token_is_never_a_hit() -> None:
    kv = KVCacheManager(num_pages=10, page_size=4)
    compute(kv, make_request("a", list(range(8))))
    # Same 8 tokens: both pages are cached, but the last token's logits are needed, so one page.
    pages, num_tokens = kv.find_cached_prefix(make_request("b", list(range(8))))
    assert (len(pages), num_tokens) == (1, 4)
    pages, num_tokens = kv.find_cached_prefix(make_request("c", list(range(9))))
    assert (len(pages), num_tokens) == (2, 8)


def test_hit_on_free_cached_page_takes_it_off_the_free_queue() -> None:
    kv = KVCacheManager(num_pages=6, page_size=4)
    a = make_request("a", list(range(12)))
    compute(kv, a)
    a_pages = list(a.page_table)
    kv.free(a)
    assert kv.num_free_pages == 6
    assert kv.num_cached_pages == 3
    b = make_request("b", list(range(13)))
    compute(kv, b)
    assert b.page_table[:3] == a_pages
    assert kv.num_free_pages == 6 - len(b.page_table)
    assert not set(b.page_table) & set(kv.pool.free_page_ids())


def test_forced_collision_misses_instead_of_sharing() -> None:
    kv = KVCacheManager(num_pages=10, page_size=4, hash_fn=lambda key: b"every page collides")
    a = make_request("a", list(range(12)))
    compute(kv, a)
    assert kv.num_cached_pages == 1  # later pages' digests were already taken
    assert kv.find_cached_prefix(make_request("b", [7, *range(1, 12)])) == ([], 0)
    # Same first page: its stored key matches, so it still hits; the next page's key differs.
    assert kv.find_cached_prefix(make_request("c", list(range(12)))) == (a.page_table[:1], 4)


def test_different_chain_digest_never_shares() -> None:
    for hash_fn in (hash_page_key, lambda key: hash_page_key(key._replace(salt=b""))):
        kv = KVCacheManager(num_pages=10, page_size=4, hash_fn=hash_fn)
        compute(kv, make_request("a", list(range(12)), salt=b"chain-a"))
        assert kv.find_cached_prefix(make_request("b", list(range(12)), salt=b"chain-b")) == ([], 0)
        assert kv.find_cached_prefix(make_request("c", list(range(12)), salt=b"chain-a"))[1] == 8


def test_cached_pages_are_evicted_lru_tail_of_sequence_first() -> None:
    kv = KVCacheManager(num_pages=4, page_size=2)
    a = make_request("a", [1, 2, 3, 4])
    compute(kv, a)
    kv.free(a)
    b = make_request("b", [5, 6, 7, 8])
    compute(kv, b)
    kv.free(b)
    assert kv.num_cached_pages == 4
    # One page of pressure evicts the oldest sequence's last page; its first page still hits.
    c = make_request("c", [9])
    assert kv.allocate(c, 1)
    assert kv.find_cached_prefix(make_request("a2", [1, 2, 3, 4, 0]))[1] == 2
    assert kv.find_cached_prefix(make_request("b2", [5, 6, 7, 8, 0]))[1] == 4
    # More pressure evicts the rest of the older sequence before touching the newer one.
    d = make_request("d", [10])
    assert kv.allocate(d, 1)
    assert kv.find_cached_prefix(make_request("a3", [1, 2, 3, 4, 0])) == ([], 0)
    assert kv.find_cached_prefix(make_request("b3", [5, 6, 7, 8, 0]))[1] == 4
    assert kv.num_cached_pages == 2


def test_uncached_pages_are_reused_before_cached_ones() -> None:
    kv = KVCacheManager(num_pages=3, page_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert kv.allocate(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_pages(a, 5)
    partial_page = a.page_table[2]
    kv.free(a)
    assert not kv.is_cached(partial_page)
    assert kv.pool.peek_free() == partial_page
    b = make_request("b", [9])
    assert kv.allocate(b, 1)
    assert kv.find_cached_prefix(make_request("a2", [1, 2, 3, 4, 5]))[1] == 4


def test_duplicate_content_is_registered_once() -> None:
    kv = KVCacheManager(num_pages=8, page_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    b = make_request("b", [1, 2, 3, 4, 5])
    # Both admitted before either computed anything: no hits, two copies of the same content.
    assert kv.allocate(a, 5) and kv.allocate(b, 5)
    for r in (a, b):
        r.num_computed_tokens = 5
        kv.cache_full_pages(r, 5)
    assert kv.num_cached_pages == 2
    assert [kv.is_cached(p) for p in a.page_table] == [True, True, False]
    assert not any(kv.is_cached(p) for p in b.page_table)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_pages == 8


def test_cached_pages_only_at_admission() -> None:
    kv = KVCacheManager(num_pages=8, page_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    compute(kv, a)
    b = make_request("b", [1, 2, 3, 4, 5])
    assert kv.allocate(b, 1)
    b.num_computed_tokens = 1
    with pytest.raises(ValueError, match="only be taken at admission"):
        kv.allocate(b, 1, a.page_table[:1])


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(num_pages=8, page_size=2, enable_prefix_caching=False)
    compute(kv, make_request("a", [1, 2, 3, 4, 5]))
    assert kv.num_cached_pages == 0
    assert kv.find_cached_prefix(make_request("b", [1, 2, 3, 4, 5])) == ([], 0)
    assert kv.prefix_stats.queries == 0
