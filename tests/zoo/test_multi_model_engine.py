"""One engine serves several models of one base in the same steps, each exactly as if served alone."""

from __future__ import annotations

from pathlib import Path

import torch

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.sampling_params import SamplingParams
from tests.runtime.engine_helpers import finish_all, random_prompts
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, fine_tune_top_layers, open_zoo

PARAMS = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def test_mixed_models_in_one_engine_match_serving_alone(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    base_dir = tiny_model_factory("llama", num_layers=3)
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("base", base_dir)
    add_tenant(zoo, "acme")
    zoo.register(
        "acme",
        "lora",
        make_adapter(base_dir, tmp_path / "ad", {"r": 4, "target_modules": ["q_proj", "up_proj"]}, 1),
    )
    zoo.register("acme", "ft", fine_tune_top_layers(base_dir, tmp_path / "ft", layers=[2], seed=3))
    chains = {
        name: zoo.load_chain(zoo.resolve("acme", name), torch.float32) for name in ("base", "lora", "ft")
    }
    tokenizer = load_tokenizer(base_dir)
    settings = Settings(kv_cache_memory=16 << 20, page_size=8)
    prompts = random_prompts(6, seed=4)
    assignment = [("base", "lora", "ft")[i % 3] for i in range(len(prompts))]

    alone: dict[str, list[int]] = {}
    for name, chain in chains.items():
        engine = LLMEngine(chain, tokenizer, settings)
        for i, (p, m) in enumerate(zip(prompts, assignment, strict=True)):
            if m == name:
                engine.add_request(p, PARAMS, request_id=str(i))
        alone.update(finish_all(engine))

    for mode in (
        {"per_block_batching": True},
        {"per_block_batching": True, "max_block_rows": 5},
        {"per_block_batching": False},
    ):
        mixed = LLMEngine(chains["base"], tokenizer, settings.model_copy(update=mode))
        for i, (p, m) in enumerate(zip(prompts, assignment, strict=True)):
            mixed.add_request(p, PARAMS, request_id=str(i), chain=chains[m], tokenizer=tokenizer, model=m)
        assert finish_all(mixed) == alone, mode
    # The models really differ: the same prompt gives different tokens on each chain.
    probe = LLMEngine(chains["base"], tokenizer, settings)
    for name, chain in chains.items():
        probe.add_request(prompts[0], PARAMS, request_id=name, chain=chain)
    outs = finish_all(probe)
    assert len({tuple(v) for v in outs.values()}) == 3
    stats = mixed.stats()
    assert stats.num_free_pages == stats.num_total_pages
