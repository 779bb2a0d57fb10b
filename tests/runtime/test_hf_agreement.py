"""Greedy tokens equal transformers' `generate`, token for token, for every supported architecture."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from blockzoo.settings import Settings
from blockzoo.tiny_models import build_tiny_model
from runtime.llm import LLM
from runtime.sampling_params import SamplingParams

NEW_TOKENS = 64
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CASES: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama"},
    "llama3-rope-tied": {"arch": "llama", "rope_scaling": LLAMA3_ROPE, "tie_embeddings": True},
    "mistral-window": {"arch": "mistral", "sliding_window": 24},
    "qwen2": {"arch": "qwen2"},
    "qwen3": {"arch": "qwen3"},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = dict(CASES[request.param])
    root = tmp_path_factory.mktemp(request.param)
    arch = case.pop("arch")
    return build_tiny_model(
        root / "model", arch, tokenizer_dir=tmp_path_factory.getbasetemp() / "tok", **case
    )


def hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
            )
        outs.append(g[0, len(p) :].tolist())
    return outs


def mixed_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(2, 70))] for _ in range(n)]


def engine(model_dir: Path, **overrides: Any) -> LLM:
    settings = Settings(kv_cache_memory=64 << 20, page_size=16, max_num_batched_tokens=256, **overrides)
    return LLM(model_dir, settings=settings)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_one_prompt_matches_transformers(model_dir: Path) -> None:
    prompts = mixed_prompts(1, seed=7)
    ours = engine(model_dir).generate(prompts, GREEDY)
    assert [r.token_ids for r in ours] == hf_greedy(model_dir, prompts)


def test_sixteen_mixed_prompts_in_one_batch_match_transformers(model_dir: Path) -> None:
    prompts = mixed_prompts(16, seed=11)
    llm = engine(model_dir)
    ours = llm.generate(prompts, GREEDY)
    expected = hf_greedy(model_dir, prompts)
    for i, (r, exp) in enumerate(zip(ours, expected, strict=True)):
        assert r.token_ids == exp, f"prompt {i} (len {len(prompts[i])}) diverged"
    stats = llm.engine.stats()
    assert stats.num_free_pages == stats.num_total_pages
