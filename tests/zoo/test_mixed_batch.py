"""Eight models of one base in one batch: each request matches its model served alone and the oracle
(transformers / peft), also under a weights budget smaller than the blocks, and over the async API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from runtime.async_engine import AsyncLLMEngine
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.residency import BlockResidency
from runtime.sampling_params import SamplingParams
from tests.runtime.engine_helpers import finish_all, random_prompts
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, fine_tune_top_layers, open_zoo
from zoo.registry import Zoo

NEW = 12
PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
ADAPTERS: dict[str, dict[str, Any]] = {
    "lora-r2-qv": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "lora-r8-attn": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "lora-r16-mlp": {"r": 16, "lora_alpha": 32, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "lora-r4-all-rs": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "lora-saved-head": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["v_proj"],
        "modules_to_save": ["lm_head"],
    },
}
FULL = {"ft-top1": [3], "ft-top2": [2, 3]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: TinyModelCache) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mixed")
    base = tiny_model_factory("qwen2", num_layers=4)
    zoo = open_zoo(root / "zoo")
    zoo.add_base("base", base)
    add_tenant(zoo, "t")
    folders: dict[str, Path] = {}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        folders[name] = make_adapter(base, root / name, cfg, seed=10 + i)
        zoo.register("t", name, folders[name])
    for i, (name, layers) in enumerate(FULL.items()):
        folders[name] = fine_tune_top_layers(base, root / name, layers, seed=20 + i)
        zoo.register("t", name, folders[name])
    models = ["base", *ADAPTERS, *FULL]
    prompts = random_prompts(len(models) * 2, seed=5, min_len=3, max_len=40)
    assignment = [models[i % len(models)] for i in range(len(prompts))]
    return {
        "zoo": zoo,
        "base": base,
        "folders": folders,
        "models": models,
        "prompts": prompts,
        "assignment": assignment,
    }


def chains(zoo: Zoo, models: list[str], residency: BlockResidency | None = None) -> dict[str, Chain]:
    out = {}
    for name in models:
        ref = zoo.resolve("t", name)
        from zoo.chain_loader import load_chain_entries

        out[name] = load_chain_entries(
            zoo.store, ref.entries, ref.raw_config, torch.float32, residency=residency
        )
    return out


def mixed_run(world: dict[str, Any], by_model: dict[str, Chain], settings: Settings) -> dict[str, list[int]]:
    tokenizer = load_tokenizer(world["base"])
    engine = LLMEngine(by_model["base"], tokenizer, settings)
    for i, (prompt, model) in enumerate(zip(world["prompts"], world["assignment"], strict=True)):
        engine.add_request(prompt, PARAMS, request_id=str(i), chain=by_model[model], tokenizer=tokenizer)
    return finish_all(engine)


def oracle(world: dict[str, Any], model: str, prompt: list[int]) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(
        world["base"] if model in ADAPTERS or model == "base" else world["folders"][model],
        dtype=torch.float32,
    )
    if model in ADAPTERS:
        hf = PeftModel.from_pretrained(hf, world["folders"][model])
    hf.eval()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        g = hf.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
        )
    return list(g[0, len(prompt) :].tolist())


@pytest.fixture(scope="module")
def alone(world: dict[str, Any]) -> dict[str, list[int]]:
    by_model = chains(world["zoo"], world["models"])
    tokenizer = load_tokenizer(world["base"])
    out: dict[str, list[int]] = {}
    for model in world["models"]:
        engine = LLMEngine(by_model[model], tokenizer, Settings(kv_cache_memory=16 << 20, page_size=8))
        for i, (prompt, m) in enumerate(zip(world["prompts"], world["assignment"], strict=True)):
            if m == model:
                engine.add_request(prompt, PARAMS, request_id=str(i))
        out.update(finish_all(engine))
    return out


def test_eight_models_in_one_batch_match_alone_and_oracle(
    world: dict[str, Any], alone: dict[str, list[int]]
) -> None:
    settings = Settings(kv_cache_memory=16 << 20, page_size=8, max_num_seqs=64)
    mixed = mixed_run(world, chains(world["zoo"], world["models"]), settings)
    assert mixed == alone
    # One request per model against transformers / peft.
    seen: set[str] = set()
    for i, model in enumerate(world["assignment"]):
        if model in seen:
            continue
        seen.add(model)
        assert alone[str(i)] == oracle(world, model, world["prompts"][i]), model
    assert seen == set(world["models"])
    assert len({tuple(alone[str(world["assignment"].index(m))]) for m in world["models"]}) > 1


def test_tight_weights_budget_evicts_and_stays_correct(
    world: dict[str, Any], alone: dict[str, list[int]]
) -> None:
    zoo: Zoo = world["zoo"]
    base_ref = zoo.resolve(None, "base")
    layer_bytes = zoo.store.nbytes(base_ref.entries[1].block_id)
    # Room for about three layer blocks; the eight chains have 4 base layers, 3 fine-tuned layers,
    # the embedding and two heads.
    residency = BlockResidency(budget_bytes=3 * layer_bytes + zoo.store.nbytes(base_ref.entries[0].block_id))
    try:
        settings = Settings(kv_cache_memory=16 << 20, page_size=8, max_num_seqs=2)
        mixed = mixed_run(world, chains(zoo, world["models"], residency), settings)
    finally:
        residency.shutdown()
    assert mixed == alone
    stats = residency.stats
    # More loads than distinct blocks (10): evicted blocks were read again, and outputs held.
    assert stats.evictions > 0 and stats.loads > 10
    assert residency.budget is not None and stats.resident_bytes <= residency.budget


def test_concurrent_requests_over_async_engine(world: dict[str, Any], alone: dict[str, list[int]]) -> None:
    by_model = chains(world["zoo"], world["models"])
    tokenizer = load_tokenizer(world["base"])
    engine = AsyncLLMEngine(
        LLMEngine(by_model["base"], tokenizer, Settings(kv_cache_memory=16 << 20, page_size=8))
    )

    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(
            world["prompts"][i], PARAMS, str(i), chain=by_model[world["assignment"][i]], tokenizer=tokenizer
        ):
            tokens = out.token_ids
        return tokens

    async def main() -> list[list[int]]:
        try:
            return await asyncio.gather(*(one(i) for i in range(len(world["prompts"]))))
        finally:
            engine.shutdown()

    results = asyncio.run(main())
    assert {str(i): r for i, r in enumerate(results)} == alone
