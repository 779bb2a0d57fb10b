"""Each request is held to its own model's context limit, whichever chain the engine was built from."""

from __future__ import annotations

import pytest
import torch

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from runtime.checkpoint_loader import load_checkpoint, load_tokenizer
from runtime.engine import LLMEngine
from runtime.errors import PromptTooLongError
from runtime.sampling_params import SamplingParams
from runtime.scheduler_config import context_limit
from tests.runtime.engine_helpers import finish_all

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def test_context_limit_is_the_models_own_capped_by_the_server() -> None:
    assert context_limit(2048, None) == 2048
    assert context_limit(2048, 256) == 256
    assert context_limit(40, 256) == 40


@pytest.mark.parametrize("cap", [None, 64])
def test_an_engine_built_from_a_short_model_still_serves_long_prompts_of_others(
    tiny_model_factory: TinyModelCache, cap: int | None
) -> None:
    long_dir = tiny_model_factory("llama", num_layers=2)  # max_position_embeddings 2048
    short_dir = tiny_model_factory("llama", num_layers=2, max_position_embeddings=40)
    long, short = (load_checkpoint(d, torch.float32) for d in (long_dir, short_dir))
    settings = Settings(kv_cache_memory=8 << 20, page_size=8, max_model_len=cap)
    # The short model starts the engine: before, its 40 tokens became every request's limit.
    engine = LLMEngine(short, load_tokenizer(short_dir), settings)
    assert engine.max_model_len() == 40 and engine.max_model_len(long) == (cap or 2048)
    engine.add_request(list(range(5, 55)), PARAMS, request_id="long-ok", chain=long)
    with pytest.raises(PromptTooLongError, match=r"exceeds max_model_len 40$"):
        engine.add_request(list(range(5, 55)), PARAMS, request_id="short-too-long")
    with pytest.raises(PromptTooLongError, match=r"exceeds max_model_len 40$"):
        engine.add_request(list(range(5, 42)), PARAMS, request_id="short-with-output", chain=short)
    if cap is not None:
        with pytest.raises(PromptTooLongError, match=rf"exceeds max_model_len {cap}$"):
            engine.add_request(list(range(5, 5 + cap)), PARAMS, request_id="over-cap", chain=long)
    engine.add_request(list(range(5, 30)), PARAMS, request_id="short-ok")
    assert {rid: len(t) for rid, t in finish_all(engine).items()} == {"long-ok": 4, "short-ok": 4}
