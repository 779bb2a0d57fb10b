"""Scheduler behaviour driven through full request lifetimes by a model-free executor."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from runtime.errors import PromptTooLongError
from runtime.kv_cache_manager import KVCacheExhaustedError, KVCacheManager
from runtime.request import Request, RequestStatus
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler
from runtime.scheduler_config import SchedulerConfig
from tests.runtime.fake_executor import FakeEngine, fake_next_token


def make_scheduler(
    budget: int = 64,
    max_num_seqs: int = 8,
    num_pages: int = 1000,
    page_size: int = 4,
    policy: str = "splitfuse",
    prefix: bool = True,
    max_model_len: int = 256,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        page_size=page_size,
        policy=policy,  # type: ignore[arg-type]
        enable_prefix_caching=prefix,
    )
    return Scheduler(config, KVCacheManager(num_pages, page_size, enable_prefix_caching=prefix))


def make_request(rid: str, prompt: list[int], max_tokens: int = 4, salt: bytes = b"chain") -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), chain_digest=salt)


def workload(seed: int, n: int, shared_prefix: int = 0) -> list[Request]:
    rng = random.Random(seed)
    system = [rng.randrange(1000) for _ in range(shared_prefix)]
    return [
        make_request(
            f"r{i}",
            system + [rng.randrange(1000) for _ in range(rng.randint(1, 40))],
            max_tokens=rng.randint(1, 12),
        )
        for i in range(n)
    ]


def run(scheduler: Scheduler, requests: list[Request]) -> tuple[FakeEngine, dict[str, list[int]]]:
    engine = FakeEngine(scheduler)
    for r in requests:
        scheduler.add_request(r)
    outputs = engine.run()
    assert scheduler.kv.num_free_pages == scheduler.kv.num_total_pages
    assert not scheduler.has_unfinished
    return engine, outputs


def expected_outputs(requests: list[Request]) -> dict[str, list[int]]:
    """What a correct engine must produce: the fake model's greedy continuation of each prompt."""
    result = {}
    for r in requests:
        tokens = list(r.prompt_token_ids)
        for _ in range(r.params.max_tokens):
            tokens.append(fake_next_token(r.chain_digest, tokens, 50_000))
        result[r.request_id] = tokens[r.num_prompt_tokens :]
    return result


@pytest.mark.parametrize("budget", [8, 32, 512])
def test_splitfuse_fills_the_budget_exactly(budget: int) -> None:
    max_num_seqs = min(budget, 16)
    scheduler = make_scheduler(budget=budget, max_num_seqs=max_num_seqs, prefix=False)
    requests = workload(seed=budget, n=24)
    engine = FakeEngine(scheduler)
    for r in requests:
        scheduler.add_request(r)
    split_prompts = 0
    while scheduler.has_unfinished:
        pending = sum(r.num_pending_tokens for r in scheduler.running)
        admissible = scheduler.waiting[: max_num_seqs - scheduler.num_running]
        available = pending + sum(r.num_tokens for r in admissible)
        record = engine.step()
        assert record.num_batched_tokens == min(budget, available)
        split_prompts += sum(1 for c in record.chunks if not c.sample)
    if budget < 40:
        assert split_prompts > 0
    assert scheduler.kv.num_free_pages == scheduler.kv.num_total_pages
    assert {rid: r.output_token_ids for rid, r in engine.finished.items()} == expected_outputs(requests)


def test_decodes_come_first_and_long_prompt_is_split() -> None:
    scheduler = make_scheduler(budget=16, max_num_seqs=4)
    engine = FakeEngine(scheduler)
    short = make_request("short", [1, 2, 3], max_tokens=8)
    scheduler.add_request(short)
    assert [(c.request_id, c.num_tokens) for c in engine.step().chunks] == [("short", 3)]
    scheduler.add_request(make_request("long", list(range(100, 140))))
    record = engine.step()
    assert [(c.request_id, c.start, c.num_tokens, c.sample) for c in record.chunks] == [
        ("short", 3, 1, True),
        ("long", 0, 15, False),
    ]
    record = engine.step()
    assert [(c.request_id, c.start, c.num_tokens) for c in record.chunks] == [
        ("short", 4, 1),
        ("long", 15, 15),
    ]
    record = engine.step()
    assert [(c.request_id, c.start, c.num_tokens, c.sample) for c in record.chunks] == [
        ("short", 5, 1, True),
        ("long", 30, 10, True),
    ]


def test_max_num_seqs_bounds_the_running_set() -> None:
    scheduler = make_scheduler(budget=64, max_num_seqs=3)
    requests = workload(seed=1, n=10)
    engine = FakeEngine(scheduler)
    for r in requests:
        scheduler.add_request(r)
    while scheduler.has_unfinished:
        record = engine.step()
        assert len(record.chunks) <= 3
        assert scheduler.num_running <= 3
    assert len(engine.finished) == 10


@pytest.mark.parametrize("policy", ["splitfuse", "prefill_first"])
@pytest.mark.parametrize("prefix", [True, False])
def test_preemption_under_small_pool_gives_the_same_tokens(policy: str, prefix: bool) -> None:
    def fresh() -> list[Request]:
        return workload(seed=7, n=12, shared_prefix=6)

    kwargs = {"budget": 64, "max_num_seqs": 8, "policy": policy, "prefix": prefix, "max_model_len": 64}
    _, reference = run(make_scheduler(num_pages=500, **kwargs), fresh())  # type: ignore[arg-type]
    small = make_scheduler(num_pages=20, **kwargs)  # type: ignore[arg-type]
    _, outputs = run(small, fresh())
    assert small.num_preemptions > 0
    assert outputs == reference == expected_outputs(fresh())


def test_preempts_most_recent_request_to_front_of_queue() -> None:
    scheduler = make_scheduler(budget=16, max_num_seqs=4, num_pages=4, page_size=2, max_model_len=16)
    engine = FakeEngine(scheduler)
    a = make_request("a", [1, 2, 3], max_tokens=5)
    b = make_request("b", [4, 5, 6], max_tokens=5)
    c = make_request("c", [7], max_tokens=1)
    for r in (a, b, c):
        scheduler.add_request(r)
    engine.step()  # a and b take all 4 pages; c cannot be admitted
    assert list(scheduler.running) == [a, b]
    assert list(scheduler.waiting) == [c]
    engine.step()  # decodes fit in the pages already held
    assert engine.steps[-1].preempted == []
    record = engine.step()  # a needs a third page: b, the most recent, is preempted
    assert record.preempted == ["b"]
    assert [ch.request_id for ch in record.chunks] == ["a"]
    assert b.status == RequestStatus.PREEMPTED
    assert (b.num_computed_tokens, b.page_table, b.num_preemptions) == (0, [], 1)
    assert b.num_output_tokens == 2
    assert list(scheduler.waiting) == [b, c]
    assert scheduler.num_preemptions == 1
    outputs = engine.run()
    assert outputs == expected_outputs([a, b, c])
    assert scheduler.kv.num_free_pages == 4


def test_lone_request_that_outgrows_the_cache_raises() -> None:
    scheduler = make_scheduler(budget=32, num_pages=2, page_size=4, max_model_len=32)
    scheduler.add_request(make_request("big", [1, 2, 3, 4, 5, 6], max_tokens=10))
    with pytest.raises(KVCacheExhaustedError, match="cache holds only 8"):
        FakeEngine(scheduler).run()


def test_prefill_first_never_mixes_prefills_and_decodes() -> None:
    requests = workload(seed=3, n=16)
    scheduler = make_scheduler(budget=64, max_num_seqs=6, policy="prefill_first", max_model_len=64)
    engine = FakeEngine(scheduler)
    for r in requests:
        scheduler.add_request(r)
    kinds = set()
    while scheduler.has_unfinished:
        waiting_before = {r.request_id for r in scheduler.waiting}
        record = engine.step()
        admitted = [c for c in record.chunks if c.request_id in waiting_before]
        if admitted:
            kinds.add("prefill")
            assert len(admitted) == len(record.chunks)
            assert all(c.sample for c in record.chunks)  # whole prompts only
        else:
            kinds.add("decode")
            assert all(c.num_tokens == 1 for c in record.chunks)
    assert kinds == {"prefill", "decode"}
    assert {rid: r.output_token_ids for rid, r in engine.finished.items()} == expected_outputs(requests)


def test_prefill_first_runs_a_prompt_longer_than_the_budget_alone() -> None:
    scheduler = make_scheduler(budget=16, max_num_seqs=4, policy="prefill_first", max_model_len=64)
    engine = FakeEngine(scheduler)
    scheduler.add_request(make_request("long", list(range(40)), max_tokens=2))
    scheduler.add_request(make_request("short", [1, 2, 3], max_tokens=2))
    assert [(c.request_id, c.num_tokens) for c in engine.step().chunks] == [("long", 40)]
    assert [(c.request_id, c.num_tokens) for c in engine.step().chunks] == [("short", 3)]
    assert [(c.request_id, c.num_tokens) for c in engine.step().chunks] == [("long", 1), ("short", 1)]
    engine.run()
    assert len(engine.finished) == 2


def test_splitfuse_mixes_prefills_and_decodes() -> None:
    scheduler = make_scheduler(budget=16, max_num_seqs=8)
    engine, _ = run(scheduler, workload(seed=3, n=16))
    mixed = [s for s in engine.steps if {c.num_tokens == 1 for c in s.chunks} == {True, False}]
    assert mixed


def test_prefix_cache_hits_on_admission() -> None:
    scheduler = make_scheduler(budget=64, page_size=4)
    engine = FakeEngine(scheduler)
    prompt = list(range(50, 70))
    first = make_request("first", prompt, max_tokens=3)
    scheduler.add_request(first)
    engine.run()
    second = make_request("second", prompt, max_tokens=3)
    other_chain = make_request("other", prompt, max_tokens=3, salt=b"another chain")
    scheduler.add_request(second)
    scheduler.add_request(other_chain)
    record = engine.step()
    assert second.num_cached_tokens == 16  # (20 - 1) // 4 full pages
    assert other_chain.num_cached_tokens == 0
    assert [(c.request_id, c.start, c.num_tokens) for c in record.chunks] == [
        ("second", 16, 4),
        ("other", 0, 20),
    ]
    engine.run()
    assert second.output_token_ids == first.output_token_ids
    assert scheduler.kv.prefix_stats.hits == 16
    assert scheduler.kv.num_free_pages == scheduler.kv.num_total_pages


@pytest.mark.parametrize("stage", ["waiting", "mid_prefill", "decode", "between_schedule_and_update"])
def test_abort_frees_everything(stage: str) -> None:
    scheduler = make_scheduler(budget=8, max_num_seqs=1)
    engine = FakeEngine(scheduler)
    a = make_request("a", list(range(30)), max_tokens=20)
    b = make_request("b", list(range(100, 110)), max_tokens=20)
    scheduler.add_request(a)
    scheduler.add_request(b)
    engine.step()
    target = {"waiting": b, "mid_prefill": a, "decode": a, "between_schedule_and_update": a}[stage]
    if stage == "decode":
        while a.num_computed_tokens < a.num_prompt_tokens:
            engine.step()
        assert a.num_output_tokens >= 1
    if stage == "between_schedule_and_update":
        output = scheduler.schedule()
        assert scheduler.abort_request("a") is a
        scheduler.update_after_step(output)
    else:
        assert scheduler.abort_request(target.request_id) is target
    assert target.status == RequestStatus.FINISHED_ABORTED
    assert target.page_table == []
    assert scheduler.abort_request(target.request_id) is None
    engine.run()
    assert scheduler.kv.num_free_pages == scheduler.kv.num_total_pages
    assert not scheduler.has_unfinished


def test_abort_all_leaves_no_pages() -> None:
    scheduler = make_scheduler(budget=16, max_num_seqs=4, num_pages=30)
    engine = FakeEngine(scheduler)
    requests = workload(seed=5, n=10)
    for r in requests:
        scheduler.add_request(r)
    for _ in range(4):
        engine.step()
    for r in requests:
        if not r.is_finished:
            scheduler.abort_request(r.request_id)
    assert (scheduler.num_running, scheduler.num_waiting) == (0, 0)
    assert scheduler.kv.num_free_pages == scheduler.kv.num_total_pages


def test_prompt_too_long_is_rejected_with_lengths() -> None:
    scheduler = make_scheduler(num_pages=4, page_size=4, max_model_len=64)
    with pytest.raises(
        PromptTooLongError, match=r"60 tokens plus max_tokens 10 = 70 exceeds max_model_len 64"
    ):
        scheduler.add_request(make_request("x", [1] * 60, max_tokens=10))
    with pytest.raises(PromptTooLongError, match=r"prompt of 20 tokens cannot fit the KV cache of 16 tokens"):
        scheduler.add_request(make_request("y", [1] * 20, max_tokens=10))
    assert not scheduler.has_unfinished


def test_request_bookkeeping_errors() -> None:
    scheduler = make_scheduler()
    r = make_request("dup", [1, 2])
    scheduler.add_request(r)
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add_request(make_request("dup", [3]))
    with pytest.raises(ValueError, match="finished status"):
        scheduler.finish_request(r, RequestStatus.RUNNING)
    scheduler.finish_request(r, RequestStatus.FINISHED_STOPPED)
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert not scheduler.has_unfinished


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValidationError):
        SchedulerConfig(policy="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="page size"):
        Scheduler(SchedulerConfig(page_size=16), KVCacheManager(8, 8))


@pytest.mark.parametrize("seed", range(40))
def test_random_configs_complete_correctly_without_leaks(seed: int) -> None:
    rng = random.Random(seed)
    policy = rng.choice(["splitfuse", "prefill_first"])
    page_size = rng.choice([1, 3, 4, 16])
    budget = rng.choice([8, 16, 128])
    # The smallest pool still holds one max_model_len request, so any single request can finish.
    num_pages = rng.randint(-(-80 // page_size), 3 * 80 // page_size)
    scheduler = make_scheduler(
        budget, rng.randint(1, 8), num_pages, page_size, policy, rng.random() < 0.6, 80
    )
    requests = workload(seed, rng.randint(1, 20), shared_prefix=rng.choice([0, 5, 17]))
    _, outputs = run(scheduler, requests)
    assert outputs == expected_outputs(requests)
