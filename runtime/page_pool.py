"""The pool of KV pages: reference counts and an O(1) free queue. Pages are plain integer ids."""

from __future__ import annotations

from collections import OrderedDict


class PagePoolError(RuntimeError):
    """The pool was asked for something impossible (no free page, releasing a free page)."""


class PagePool:
    """`num_pages` pages of `page_size` token slots, each with a reference count.

    Pages whose count is zero sit in the free queue. Allocation takes the head; a released page
    goes to the tail (it may still hold a cached prefix, so it is evicted last) or, when it holds
    nothing worth keeping, to the head. Taking a reference on a free page pulls it out of the
    queue. Every operation is O(1): the queue is an `OrderedDict`, a C doubly linked list.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._ref_counts = [0] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of pages referenced by at least one request."""
        return self.num_used_pages / self.num_pages

    def ref_count(self, page_id: int) -> int:
        self._check_id(page_id)
        return self._ref_counts[page_id]

    def is_free(self, page_id: int) -> bool:
        self._check_id(page_id)
        return self._ref_counts[page_id] == 0

    def free_page_ids(self) -> list[int]:
        """The free queue from head (next to allocate) to tail; O(n), for tests and debugging."""
        return list(self._free)

    def peek_free(self) -> int | None:
        """The page the next `pop_free` returns, or None if none is free."""
        return next(iter(self._free), None)

    def pop_free(self) -> int:
        """Take the page at the head of the free queue with one reference."""
        if not self._free:
            raise PagePoolError(f"no free page left (all {self.num_pages} pages referenced)")
        page_id, _ = self._free.popitem(last=False)
        self._ref_counts[page_id] = 1
        return page_id

    def acquire(self, page_id: int) -> None:
        """Add a reference, pulling the page out of the free queue if nobody held it."""
        self._check_id(page_id)
        if self._ref_counts[page_id] == 0:
            del self._free[page_id]
        self._ref_counts[page_id] += 1

    def release(self, page_id: int, keep: bool = True) -> None:
        """Drop a reference. At zero the page is free: at the tail if `keep`, else at the head."""
        self._check_id(page_id)
        if self._ref_counts[page_id] == 0:
            raise PagePoolError(f"page {page_id} released more often than acquired")
        self._ref_counts[page_id] -= 1
        if self._ref_counts[page_id] == 0:
            self._free[page_id] = None
            if not keep:
                self._free.move_to_end(page_id, last=False)

    def _check_id(self, page_id: int) -> None:
        if not 0 <= page_id < self.num_pages:
            raise PagePoolError(f"page id {page_id} outside [0, {self.num_pages})")
