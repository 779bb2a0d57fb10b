"""An exception inside one engine step fails that step's requests only; the engine and the rest go on.

The fault is injected into the real executor of a real engine on a tiny model: the forward pass runs
(writing KV) and then raises, once, for the first step that holds a chosen request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from runtime.async_engine import AsyncLLMEngine
from runtime.engine import LLMEngine, StepFailedError
from runtime.sampling_params import SamplingParams
from runtime.scheduler_output import ExecutorOutput, SchedulerOutput
from tests.runtime.engine_helpers import finish_all, random_prompts

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


class InjectedFault(RuntimeError):
    """The bug a test plants in one step."""


class FailOnce:
    """Wraps `engine.executor.execute`: the first step that holds `target` (after `after_steps`
    steps holding it) runs, then raises."""

    def __init__(self, engine: LLMEngine, target: str, after_steps: int = 0) -> None:
        self.real = engine.executor.execute
        self.target = target
        self.after_steps = after_steps
        self.failed_step: list[str] | None = None
        engine.executor.execute = self  # type: ignore[method-assign,assignment]

    def __call__(self, plan: SchedulerOutput) -> ExecutorOutput:
        result = self.real(plan)
        ids = [c.request.request_id for c in plan.chunks]
        if self.failed_step is None and self.target in ids:
            if self.after_steps == 0:
                self.failed_step = ids
                raise InjectedFault("injected fault")
            self.after_steps -= 1
        return result


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama")


def make_engine(model_dir: Path, max_num_seqs: int) -> LLMEngine:
    settings = Settings(
        kv_cache_memory=8 << 20, page_size=8, max_num_seqs=max_num_seqs, max_num_batched_tokens=256
    )
    return LLMEngine.from_path(model_dir, settings)


def reference(model_dir: Path, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Each prompt alone on a fresh, fault-free engine."""
    out: dict[str, list[int]] = {}
    for rid, prompt in prompts.items():
        engine = make_engine(model_dir, 4)
        engine.add_request(prompt, PARAMS, request_id=rid)
        out.update(finish_all(engine))
    return out


def assert_all_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_pages == stats.num_total_pages


def test_a_failed_step_aborts_its_requests_and_the_waiting_ones_finish(model_dir: Path) -> None:
    prompts = dict(zip("abcd", random_prompts(4, seed=11, min_len=10, max_len=30), strict=True))
    expected = reference(model_dir, prompts)
    engine = make_engine(model_dir, max_num_seqs=2)  # a and b run, c and d wait
    fault = FailOnce(engine, "a")
    for rid, prompt in prompts.items():
        engine.add_request(prompt, PARAMS, request_id=rid)
    with pytest.raises(StepFailedError) as err:
        engine.step()
    assert isinstance(err.value.__cause__, InjectedFault)
    assert err.value.request_ids == fault.failed_step == ["a", "b"]
    assert engine.scheduler.get_request("a") is None and engine.scheduler.get_request("b") is None
    assert finish_all(engine) == {"c": expected["c"], "d": expected["d"]}
    assert_all_free(engine)
    # The engine goes on: the failed prompts, sent again, give the right tokens (nothing the failed
    # step wrote is served from the prefix cache).
    engine.add_request(prompts["a"], PARAMS, request_id="a2")
    engine.add_request(prompts["b"], PARAMS, request_id="b2")
    assert finish_all(engine) == {"a2": expected["a"], "b2": expected["b"]}
    assert_all_free(engine)


def test_a_failed_decode_step_spares_the_waiting_request(model_dir: Path) -> None:
    prompts = dict(zip("xyz", random_prompts(3, seed=12, min_len=10, max_len=30), strict=True))
    expected = reference(model_dir, prompts)
    engine = make_engine(model_dir, max_num_seqs=2)
    FailOnce(engine, "x", after_steps=3)  # x and y have prefilled and decoded a few tokens
    for rid, prompt in prompts.items():
        engine.add_request(prompt, PARAMS, request_id=rid)
    done: dict[str, list[int]] = {}
    failed: list[str] = []
    while engine.has_unfinished_requests():
        try:
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        except StepFailedError as exc:
            failed += exc.request_ids
    assert failed == ["x", "y"] and done == {"z": expected["z"]}
    assert_all_free(engine)


def test_async_engine_fails_only_the_streams_of_the_failed_step(model_dir: Path) -> None:
    prompts = dict(zip("abcd", random_prompts(4, seed=13, min_len=10, max_len=30), strict=True))
    expected = reference(model_dir, prompts)
    sync = make_engine(model_dir, max_num_seqs=1)  # the failing step holds `a` alone
    FailOnce(sync, "a")
    engine = AsyncLLMEngine(sync)

    async def collect(rid: str) -> list[int] | BaseException:
        stream = await engine.add_request(prompts[rid], PARAMS, request_id=rid)
        tokens: list[int] = []
        try:
            async for out in stream:
                tokens = out.token_ids
        except StepFailedError as exc:
            return exc
        return tokens

    async def main() -> dict[str, list[int] | BaseException]:
        results = await asyncio.gather(*(collect(rid) for rid in prompts))
        return dict(zip(prompts, results, strict=True))

    try:
        results = asyncio.run(main())
        assert isinstance(results["a"], StepFailedError) and results["a"].request_ids == ["a"]
        assert {rid: results[rid] for rid in "bcd"} == {rid: expected[rid] for rid in "bcd"}
        assert engine.running
        again = asyncio.run(asyncio.wait_for(collect("a"), 30))
        assert again == expected["a"]
        assert_all_free(sync)
    finally:
        engine.shutdown()
