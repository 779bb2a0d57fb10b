"""Splitting checkpoints into blocks, and loading chains back from the store (zoo.chain_loader)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.errors import MissingFileError
from runtime.llm import LLM
from runtime.sampling_params import SamplingParams
from zoo.block_store import BlockStore
from zoo.chain_loader import ChainAssemblyError, ChainEntry, chain_digests, load_chain
from zoo.splitter import split_checkpoint

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and the zoo keeps many blocks of many models.",
    "What is two plus two?",
    "Keys and values are cached in pages of sixteen tokens; when memory runs out a request waits.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
CASES: dict[str, dict[str, Any]] = {
    "llama-tied": {"arch": "llama", "tie_embeddings": True},
    "mistral-window": {"arch": "mistral", "sliding_window": 8},
    "qwen2": {"arch": "qwen2"},
    "qwen3": {"arch": "qwen3"},
}


def hf_name(kind: str, index: int, name: str) -> str:
    if kind == "layer":
        return f"model.layers.{index}.{name}"
    return name if name == "lm_head.weight" else f"model.{name}"


def rewrite_weights(
    src: Path, dst: Path, tensors: dict[str, torch.Tensor], num_files: int, seed: int
) -> Path:
    """Copy `src` without its weights to `dst` and write `tensors` over `num_files` shuffled, unindexed files."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    names = list(tensors)
    random.Random(seed).shuffle(names)
    for i in range(num_files):
        part = {n: tensors[n].clone() for n in names[i::num_files]}
        save_file(part, str(dst / f"part-{num_files - i}.safetensors"), metadata={"format": "pt"})
    return dst


def test_blocks_hold_the_checkpoint_tensors_in_chain_order(tiny_model_factory: TinyModelCache) -> None:
    folder = tiny_model_factory("qwen2", num_layers=3)
    calls: list[tuple[int, int]] = []
    split = split_checkpoint(folder, progress=lambda done, total: calls.append((done, total)))
    assert [b.kind for b in split.blocks] == ["embed", "layer", "layer", "layer", "head"]
    assert calls == [(i, 5) for i in range(1, 6)]
    assert split.raw_config == json.loads((folder / "config.json").read_text())
    assert split.config.num_layers == 3
    reference = load_file(str(folder / "model.safetensors"))
    seen = set()
    for index, block in enumerate(split.blocks):
        for name, t in block.tensors.items():
            full = hf_name(block.kind, index - 1, name)
            assert torch.equal(t, reference[full]), full
            seen.add(full)
    assert seen == set(reference)
    assert "self_attn.q_proj.bias" in split.blocks[1].tensors
    assert split.blocks[-1].fields["tied"] is False
    assert [b.fields.get("sliding_window") for b in split.blocks[1:-1]] == [None] * 3


def test_ids_do_not_depend_on_sharding_or_tensor_order(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    single = tiny_model_factory("llama", num_layers=3)
    sharded = tiny_model_factory("llama", num_layers=3, max_shard_size="40KB")
    assert (
        len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").exists()
    )
    shuffled = rewrite_weights(
        single, tmp_path / "shuffled", load_file(str(single / "model.safetensors")), 3, 1
    )
    ids = split_checkpoint(single).block_ids
    assert len(set(ids)) == len(ids)
    assert split_checkpoint(sharded).block_ids == ids
    assert split_checkpoint(shuffled).block_ids == ids


def test_tied_and_untied_heads_differ_but_embed_and_layers_are_shared(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    tied_dir = tiny_model_factory("llama", tie_embeddings=True)
    weights = load_file(str(tied_dir / "model.safetensors"))
    assert "lm_head.weight" not in weights
    untied_dir = rewrite_weights(
        tied_dir,
        tmp_path / "untied",
        {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]},
        2,
        0,
    )
    config = json.loads((untied_dir / "config.json").read_text())
    (untied_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    tied, untied = split_checkpoint(tied_dir), split_checkpoint(untied_dir)
    assert tied.block_ids[:-1] == untied.block_ids[:-1]
    assert tied.block_ids[-1] != untied.block_ids[-1]
    assert set(tied.blocks[-1].tensors) == {"norm.weight"} and tied.blocks[-1].fields["tied"] is True
    assert set(untied.blocks[-1].tensors) == {"norm.weight", "lm_head.weight"}
    assert untied.blocks[-1].fields["tied"] is False


def test_a_fine_tune_shares_every_block_it_did_not_change(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    base_dir = tiny_model_factory("mistral", num_layers=3)
    weights = load_file(str(base_dir / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] += 0.5
    tuned = split_checkpoint(rewrite_weights(base_dir, tmp_path / "tuned", weights, 1, 0)).block_ids
    base = split_checkpoint(base_dir).block_ids
    assert [a == b for a, b in zip(base, tuned, strict=True)] == [True, True, False, True, True]
    other_seed = split_checkpoint(tiny_model_factory("mistral", num_layers=3, seed=1)).block_ids
    assert set(other_seed[:-1]).isdisjoint(base)
    # The head is a norm of ones plus lm_head; a different seed changes lm_head.
    assert other_seed[-1] != base[-1]


def test_split_errors_come_from_the_runtime_loader(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    with pytest.raises(MissingFileError, match=r"config\.json is missing"):
        split_checkpoint(tmp_path / "absent")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model_factory("llama"), no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(MissingFileError, match=r"no \*\.safetensors"):
        split_checkpoint(no_weights)


# ---- chain digests and chain loading ----------------------------------------------------------


def ids(*seeds: int) -> list[str]:
    return [f"{s:064x}" for s in seeds]


def test_chain_digests_agree_exactly_on_common_prefixes() -> None:
    a = [ChainEntry(i) for i in ids(1, 2, 3, 4)]
    b = [ChainEntry(i) for i in ids(1, 2, 9, 4)]
    da, db = chain_digests(a), chain_digests(b)
    assert len(da) == 4 and len(set(da)) == 4
    assert da[:2] == db[:2]
    assert all(x != y for x, y in zip(da[2:], db[2:], strict=True))  # divergence propagates
    assert chain_digests(a[:3]) == da[:3]
    with_delta = [*a[:2], a[2]._replace(delta_ids=tuple(ids(7))), a[3]]
    dd = chain_digests(with_delta)
    assert dd[:2] == da[:2] and dd[2] != da[2]
    swapped = [*a[:2], a[2]._replace(delta_ids=tuple(ids(8, 7))), a[3]]
    two = [*a[:2], a[2]._replace(delta_ids=tuple(ids(7, 8))), a[3]]
    assert chain_digests(swapped)[2] != chain_digests(two)[2] != dd[2]
    assert chain_digests([]) == []


@pytest.fixture(scope="module", params=sorted(CASES))
def stored_model(
    request: pytest.FixtureRequest,
    tiny_model_factory: TinyModelCache,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, BlockStore, list[str], dict[str, Any], str]:
    case = dict(CASES[request.param])
    folder = tiny_model_factory(case.pop("arch"), **case)
    store = BlockStore(tmp_path_factory.mktemp("store"))
    split = split_checkpoint(folder)
    for block in split.blocks:
        store.put(block)
    return folder, store, split.block_ids, split.raw_config, store.put_tokenizer(folder)


def settings() -> Settings:
    return Settings(kv_cache_memory=16 << 20, page_size=8, max_num_batched_tokens=512)


def test_chain_from_the_store_generates_like_the_folder(
    stored_model: tuple[Path, BlockStore, list[str], dict[str, Any], str],
) -> None:
    folder, store, block_ids, raw_config, tokenizer_id = stored_model
    chain = load_chain(store, block_ids, raw_config, torch.float32, verify=True)
    assert chain.digest == chain_digests([ChainEntry(b) for b in block_ids])[-1]
    engine = LLMEngine(chain, load_tokenizer(store.tokenizer_path(tokenizer_id)), settings())
    ours = LLM(engine=engine).generate(PROMPTS, GREEDY)
    reference = LLM(folder, settings=settings()).generate(PROMPTS, GREEDY)
    assert [r.prompt_token_ids for r in ours] == [r.prompt_token_ids for r in reference]
    assert [r.token_ids for r in ours] == [r.token_ids for r in reference]


def test_chain_from_the_store_has_transformers_logits(
    stored_model: tuple[Path, BlockStore, list[str], dict[str, Any], str],
) -> None:
    folder, store, block_ids, raw_config, tokenizer_id = stored_model
    chain = load_chain(store, block_ids, raw_config, torch.float32)
    engine = LLMEngine(chain, load_tokenizer(store.tokenizer_path(tokenizer_id)), settings())
    rids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    result = engine.executor.execute(engine.scheduler.schedule())  # one step covers every whole prompt
    assert [r.request_id for r in result.requests] == rids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for row, request in enumerate(result.requests):
        with torch.no_grad():
            expected = model(torch.tensor([request.prompt_token_ids])).logits[0, -1]
        torch.testing.assert_close(result.logits[row], expected, atol=1e-4, rtol=0)


def test_load_chain_casts_and_refuses_blocks_that_do_not_fit(
    stored_model: tuple[Path, BlockStore, list[str], dict[str, Any], str],
) -> None:
    _, store, block_ids, raw_config, _ = stored_model
    chain = load_chain(store, block_ids, raw_config, torch.bfloat16)
    assert (
        chain.layers[0].q_proj.weight.dtype == torch.bfloat16 and chain.head.lm_head.dtype == torch.bfloat16
    )
    with pytest.raises(ChainAssemblyError, match="needs 4 chain entries, got 3"):
        load_chain(store, block_ids[:-1], raw_config, torch.float32)
    with pytest.raises(ChainAssemblyError, match=r"position 0 .*kind 'embed', got 'layer'"):
        load_chain(store, [block_ids[1], block_ids[0], *block_ids[2:]], raw_config, torch.float32)
    with pytest.raises(ChainAssemblyError, match="rms_norm_eps: block has 1e-06, config needs 1e-05"):
        load_chain(store, block_ids, {**raw_config, "rms_norm_eps": 1e-5}, torch.float32)
