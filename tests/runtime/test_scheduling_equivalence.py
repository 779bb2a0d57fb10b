"""Scheduling changes nothing: chunking, prefix-cache hits and preemption give the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockzoo.tiny_models import TinyModelCache
from runtime.sampling_params import SamplingParams
from tests.runtime.engine_helpers import assert_no_leaks, make_llm, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(12, seed=3, min_len=20, max_len=120)


@pytest.fixture(scope="module")
def unchunked(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    llm = make_llm(model_dir, max_num_batched_tokens=4096, enable_prefix_caching=False)
    out = [r.token_ids for r in llm.generate(prompts, GREEDY)]
    assert_no_leaks(llm)
    return out


@pytest.mark.parametrize("budget", [8, 32, 512])
def test_chunked_prefill_matches_unchunked(
    model_dir: Path, prompts: list[list[int]], unchunked: list[list[int]], budget: int
) -> None:
    llm = make_llm(
        model_dir, max_num_batched_tokens=budget, max_num_seqs=min(budget, 64), enable_prefix_caching=False
    )
    assert [r.token_ids for r in llm.generate(prompts, GREEDY)] == unchunked
    assert_no_leaks(llm)


def test_prefill_first_policy_matches(
    model_dir: Path, prompts: list[list[int]], unchunked: list[list[int]]
) -> None:
    llm = make_llm(model_dir, max_num_batched_tokens=4096, scheduler_policy="prefill_first")
    assert [r.token_ids for r in llm.generate(prompts, GREEDY)] == unchunked
    assert_no_leaks(llm)


def test_prefix_cache_hit_matches_miss(model_dir: Path) -> None:
    shared = random_prompts(1, seed=9, min_len=50, max_len=51)[0]
    tails = random_prompts(6, seed=10, min_len=1, max_len=20)
    prompts = [shared + t for t in tails]
    miss = make_llm(model_dir, enable_prefix_caching=False)
    expected = [r.token_ids for r in miss.generate(prompts, GREEDY)]
    llm = make_llm(model_dir, enable_prefix_caching=True)
    first = [r.token_ids for r in llm.generate(prompts[:1], GREEDY)]
    hits_before = llm.engine.stats().prefix_hits
    results = llm.generate(prompts, GREEDY)
    assert first == expected[:1]
    assert [r.token_ids for r in results] == expected
    stats = llm.engine.stats()
    # Every prompt of the second batch shares at least the 6 full pages of the 50-token prefix.
    assert stats.prefix_hits - hits_before >= 6 * 48
    assert_no_leaks(llm)


def test_preemption_under_small_pool_matches(
    model_dir: Path, prompts: list[list[int]], unchunked: list[list[int]]
) -> None:
    # 40 pages of 8 tokens cannot hold 12 requests of up to 144 tokens at once.
    llm = make_llm(model_dir, num_kv_pages=40, max_num_batched_tokens=64, enable_prefix_caching=False)
    assert [r.token_ids for r in llm.generate(prompts, GREEDY)] == unchunked
    assert llm.engine.stats().num_preemptions > 0
    assert_no_leaks(llm)


def test_preemption_with_prefix_cache_matches(
    model_dir: Path, prompts: list[list[int]], unchunked: list[list[int]]
) -> None:
    llm = make_llm(model_dir, num_kv_pages=40, max_num_batched_tokens=64, enable_prefix_caching=True)
    assert [r.token_ids for r in llm.generate(prompts, GREEDY)] == unchunked
    assert llm.engine.stats().num_preemptions > 0
    assert_no_leaks(llm)


def test_abort_frees_pages(model_dir: Path, prompts: list[list[int]]) -> None:
    llm = make_llm(model_dir, max_num_batched_tokens=16, max_num_seqs=16)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts[:4]]
    for _ in range(3):
        engine.step()
    # One request mid-prefill or decode, one still waiting, and the rest finish normally.
    assert engine.abort(ids[0])
    assert engine.abort(ids[3])
    assert not engine.abort("no-such-request")
    finished = set()
    while engine.has_unfinished_requests():
        finished.update(o.request_id for o in engine.step() if o.finished)
    assert finished == {ids[1], ids[2]}
    assert_no_leaks(llm)
