"""Small helpers shared by the engine-level tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from blockzoo.settings import Settings
from runtime.engine import LLMEngine
from runtime.llm import LLM


def make_llm(model_dir: Path, **overrides: Any) -> LLM:
    base: dict[str, Any] = {"kv_cache_memory": 32 << 20, "page_size": 8, "max_num_batched_tokens": 512}
    base.update(overrides)
    return LLM(model_dir, settings=Settings(**base))


def random_prompts(n: int, seed: int, min_len: int = 2, max_len: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randrange(min_len, max_len))] for _ in range(n)]


def assert_no_leaks(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_pages == stats.num_total_pages


def finish_all(engine: LLMEngine) -> dict[str, list[int]]:
    """Step `engine` until every request finished; each request id's final tokens."""
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    return out
