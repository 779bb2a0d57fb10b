"""The engine's interfaces: sync step loop, asyncio streaming, offline LLM, and bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockzoo.tiny_models import TinyModelCache
from runtime.async_engine import AsyncLLMEngine
from runtime.errors import PromptTooLongError
from runtime.sampling_params import SamplingParams
from tests.runtime.engine_helpers import assert_no_leaks, make_llm, random_prompts


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama")


def test_seeded_sampling_reproduces_across_batches(model_dir: Path) -> None:
    prompts = random_prompts(6, seed=1)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=20, ignore_eos=True)
    llm = make_llm(model_dir)
    alone = llm.generate(prompts[:1], params)[0].token_ids
    together = llm.generate(prompts, params)[0].token_ids
    assert alone == together
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=43, max_tokens=20, ignore_eos=True)
    assert llm.generate(prompts[:1], other_seed)[0].token_ids != alone
    assert_no_leaks(llm)


def test_stop_string_and_stop_token_end_generation(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    prompt = random_prompts(1, seed=5)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    assert len(free.token_ids) == 30 and free.finish_reason == "length"
    stop_id = free.token_ids[10]
    first = free.token_ids.index(stop_id)
    by_token = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=(stop_id,))
    )[0]
    assert by_token.token_ids == free.token_ids[: first + 1]
    assert by_token.finish_reason == "stop"
    # A stop string taken from the middle of the free text cuts the text right before it.
    text = free.text
    start = next(
        i for i in range(len(text) // 2, len(text) - 3) if text[i : i + 3].strip() == text[i : i + 3]
    )
    needle = text[start : start + 3]
    by_text = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(needle,))
    )[0]
    assert by_text.finish_reason == "stop"
    assert by_text.text == text[: text.index(needle)]
    assert_no_leaks(llm)


def test_eos_stops_unless_ignored(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    prompt = random_prompts(1, seed=6)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    # Declare the 5th greedy token to be EOS for this engine: generation must stop right there.
    eos = free.token_ids[4]
    llm.engine.eos_token_ids = frozenset([eos])
    stopped = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "stop"
    ignored = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert ignored.token_ids == free.token_ids


def test_logprobs_are_reported(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    result = llm.generate(
        random_prompts(1, seed=8), SamplingParams(temperature=0.0, max_tokens=5, logprobs=3)
    )[0]
    assert len(result.logprobs) == len(result.token_ids)
    for tok, lp in zip(result.token_ids, result.logprobs, strict=True):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        # Greedy picks the most likely token, so it heads the top list.
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob)


def test_prompt_too_long_is_a_clear_error(model_dir: Path) -> None:
    llm = make_llm(model_dir, max_model_len=64)
    with pytest.raises(PromptTooLongError, match="64"):
        llm.engine.add_request(list(range(5, 70)), SamplingParams(max_tokens=4))
    with pytest.raises(PromptTooLongError):
        llm.engine.add_request(list(range(5, 40)), SamplingParams(max_tokens=40))
    assert_no_leaks(llm)


def test_async_engine_streams_and_matches_offline(model_dir: Path) -> None:
    prompts = random_prompts(5, seed=12)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = [r.token_ids for r in make_llm(model_dir).generate(prompts, params)]
    llm = make_llm(model_dir)
    engine = AsyncLLMEngine(llm.engine)

    async def one(i: int) -> tuple[list[int], int]:
        tokens: list[int] = []
        chunks = 0
        async for out in engine.generate(prompts[i], params, request_id=f"r{i}"):
            tokens.extend(out.new_token_ids)
            chunks += 1
        return tokens, chunks

    async def main() -> list[tuple[list[int], int]]:
        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            engine.shutdown()

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(chunks == 16 for _, chunks in results)  # streamed token by token
    assert_no_leaks(llm)


def test_async_stream_closed_early_aborts_request(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    engine = AsyncLLMEngine(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main() -> None:
        try:
            stream = engine.generate(random_prompts(1, seed=2)[0], params, request_id="gone")
            async for _ in stream:
                break  # the client went away after the first token
            await stream.aclose()
            assert await engine.call(lambda: not llm.engine.has_unfinished_requests())
        finally:
            engine.shutdown()

    asyncio.run(main())
    assert_no_leaks(llm)


def test_a_slow_consumer_gets_queued_outputs_in_one_batch(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    engine = AsyncLLMEngine(llm.engine)
    prompt = random_prompts(1, seed=4)[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = llm.generate([prompt], params)[0].token_ids

    async def main() -> list[list[int]]:
        try:
            stream = await engine.add_request(prompt, params, request_id="slow")
            # Consume nothing until the engine is done: every step's output is queued meanwhile.
            while not await engine.call(lambda: not llm.engine.has_unfinished_requests()):
                await asyncio.sleep(0.01)
            return [[t for out in batch for t in out.new_token_ids] async for batch in stream.batches()]
        finally:
            engine.shutdown()

    batches = asyncio.run(main())
    assert len(batches) == 1 and batches[0] == expected
    assert_no_leaks(llm)


def test_async_bad_request_raises_to_caller(model_dir: Path) -> None:
    llm = make_llm(model_dir, max_model_len=32)
    engine = AsyncLLMEngine(llm.engine)

    async def main() -> None:
        try:
            with pytest.raises(PromptTooLongError):
                async for _ in engine.generate(list(range(5, 60)), SamplingParams(), request_id="long"):
                    pass
        finally:
            engine.shutdown()

    asyncio.run(main())
