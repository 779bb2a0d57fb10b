"""LoRA adapters served from the zoo give peft's logits and greedy tokens on the same base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.executor import ModelExecutor
from runtime.kv_tensors import KVTensors
from runtime.request import Request
from runtime.sampling_params import SamplingParams
from runtime.scheduler_output import ScheduledChunk, SchedulerOutput
from zoo.adapter_chain import adapter_chain
from zoo.block_store import BlockStore
from zoo.chain_loader import ChainEntry, load_chain_entries
from zoo.peft_adapter import UnsupportedAdapterError, read_peft_adapter
from zoo.splitter import split_checkpoint

ADAPTERS: dict[str, dict[str, Any]] = {
    "qv-r8": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "all-linear-r16-rslora": {
        "r": 16,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "mlp-r4-patterns": {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"up_proj": 12},
    },
    "save-embed-head": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["o_proj"],
        "modules_to_save": ["embed_tokens", "lm_head"],
    },
}


def make_adapter(base: Path, out: Path, cfg: dict[str, Any], seed: int) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            # peft starts B at zero (a no-op adapter); random A and B make the test meaningful.
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("qwen2")


@pytest.fixture(scope="module")
def store_with_base(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[BlockStore, list[ChainEntry]]:
    store = BlockStore(tmp_path_factory.mktemp("store"))
    split = split_checkpoint(base)
    for block in split.blocks:
        store.put(block)
    return store, [ChainEntry(b) for b in split.block_ids]


def last_logits(engine_chain: Any, prompt: list[int]) -> torch.Tensor:
    kv = KVTensors(engine_chain.config, 16, 16, torch.float32)
    request = Request("r", prompt, SamplingParams(temperature=0))
    request.page_table = list(range(-(-len(prompt) // 16)))
    out = ModelExecutor(engine_chain, kv).execute(
        SchedulerOutput([ScheduledChunk(request, len(prompt), True)], [], 0)
    )
    return out.logits[0]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_matches_peft(
    name: str, base: Path, store_with_base: tuple[BlockStore, list[ChainEntry]], tmp_path: Path
) -> None:
    store, base_entries = store_with_base
    folder = make_adapter(base, tmp_path / name, ADAPTERS[name], seed=len(name))
    split_config = split_checkpoint(base)
    adapter = read_peft_adapter(folder, split_config.config)
    built = adapter_chain(adapter, base_entries, split_config.config, store)
    for block in built.new_blocks:
        store.put(block)
    for delta in built.deltas:
        store.put(delta)
    chain = load_chain_entries(store, built.entries, split_config.raw_config, torch.float32)

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder
    )
    reference.eval()
    prompt = [1, 17, 99, 254, 31, 8, 77, 400, 12]
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0, -1]
    ours = last_logits(chain, prompt)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()
    # The adapter really changes the model: base logits differ.
    base_chain = load_chain_entries(store, base_entries, split_config.raw_config, torch.float32)
    assert not torch.allclose(last_logits(base_chain, prompt), expected, atol=1e-3)

    # Greedy generation agrees token for token too.
    engine = LLMEngine(chain, load_tokenizer(base), Settings(kv_cache_memory=16 << 20))
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), request_id="g")
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.token_ids
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = reference.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
        )
    assert tokens == ref[0, len(prompt) :].tolist()


def test_dora_is_refused_by_name(base: Path, tmp_path: Path) -> None:
    folder = make_adapter(
        base, tmp_path / "dora", {"r": 4, "target_modules": ["q_proj"], "use_dora": True}, 1
    )
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        read_peft_adapter(folder, split_checkpoint(base).config)
