"""A base and a fine-tune of its top layers share the lower layers' KV pages for a common prefix."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.executor import BatchInputs
from runtime.kv_segments import KVSegments
from runtime.sampling_params import SamplingParams
from runtime.scheduler_output import SchedulerOutput
from tests.runtime.engine_helpers import finish_all
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, fine_tune_top_layers, open_zoo
from zoo.kv_layout import divergence_counts, first_divergent_layer, kv_cuts
from zoo.registry import Zoo

PAGE = 8
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def four_layer_zoo(tmp_path: Path, tiny_model_factory: TinyModelCache) -> tuple[Path, Zoo]:
    """A zoo holding a 4-layer base, with tenant acme."""
    base_dir = tiny_model_factory("llama", num_layers=4)
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("base", base_dir)
    add_tenant(zoo, "acme")
    return base_dir, zoo


def hf_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return [int(t) for t in ids[0, len(prompt) :]]


def test_base_and_partial_fine_tune_share_lower_layer_pages(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    base_dir, zoo = four_layer_zoo(tmp_path, tiny_model_factory)
    ft_dir = fine_tune_top_layers(base_dir, tmp_path / "ft", layers=[2, 3], seed=5)
    zoo.register("acme", "ft", ft_dir)
    zoo.register(
        "acme", "lora", make_adapter(base_dir, tmp_path / "ad", {"r": 4, "target_modules": ["v_proj"]}, 2)
    )
    chains = {n: zoo.load_chain(zoo.resolve("acme", n), torch.float32) for n in ("base", "ft", "lora")}
    tokenizer = load_tokenizer(base_dir)
    settings = Settings(kv_cache_memory=16 << 20, page_size=PAGE)
    gen = torch.Generator().manual_seed(9)
    shared = torch.randint(5, 500, (5 * PAGE,), generator=gen).tolist()
    prompts = {
        "base-1": [*shared, 11, 12, 13],
        "ft-1": [*shared, 21, 22],
        "ft-2": [*shared, 31],  # same model again: every layer's pages come from ft-1
        "lora-1": [*shared, 41, 42, 43, 44],  # diverges at layer 0: nothing to share
    }

    # The reference: every request alone, on an engine of its own model with one KV segment.
    alone: dict[str, list[int]] = {}
    for rid, prompt in prompts.items():
        engine = LLMEngine(chains[rid.split("-")[0]], tokenizer, settings)
        engine.add_request(prompt, PARAMS, request_id=rid)
        alone.update(finish_all(engine))
    assert alone["base-1"] == hf_greedy(base_dir, prompts["base-1"], 12)
    assert alone["ft-1"] == hf_greedy(ft_dir, prompts["ft-1"], 12)

    engine = LLMEngine(chains["base"], tokenizer, settings, kv_segments=KVSegments.cut_at(4, [2]))
    manager = engine.kv_manager
    # Record what the real executor prepares, to see which KV slots each step writes.
    prepared: list[BatchInputs] = []
    real_prepare = engine.executor.prepare

    def recording_prepare(output: SchedulerOutput) -> BatchInputs:
        prepared.append(real_prepare(output))
        return prepared[-1]

    engine.executor.prepare = recording_prepare  # type: ignore[method-assign]
    outputs: dict[str, list[int]] = {}
    tables: dict[str, list[list[int]]] = {}
    admitted: dict[str, BatchInputs] = {}
    for rid, prompt in prompts.items():
        # One at a time, so that each request's pages are registered before the next looks them up.
        engine.add_request(prompt, PARAMS, request_id=rid, chain=chains[rid.split("-")[0]])
        engine.step()
        req = engine.scheduler.running[-1]
        tables[rid] = [list(t) for t in req.page_tables]
        admitted[rid] = prepared[-1]
        outputs.update(finish_all(engine))
    assert outputs == alone

    full = len(shared) // PAGE  # 5 full pages of the shared prefix
    # ft-1 reuses the base's pages in layers 0-1 and computes its own in layers 2-3.
    assert tables["ft-1"][0][:full] == tables["base-1"][0][:full]
    assert not set(tables["ft-1"][1]) & set(tables["base-1"][1])
    # Its prefill computed every position, but wrote segment 0 only past the shared pages.
    first = admitted["ft-1"]
    shared_slots = {p * PAGE + i for p in tables["base-1"][0][:full] for i in range(PAGE)}
    assert len(first.metas[1].slot_mapping) == len(prompts["ft-1"]) and first.metas[1].write_rows is None
    assert len(first.metas[0].slot_mapping) == len(prompts["ft-1"]) - full * PAGE
    assert not set(first.metas[0].slot_mapping.tolist()) & shared_slots
    assert first.metas[0].write_rows is not None
    assert first.metas[0].write_rows.tolist() == list(range(full * PAGE, len(prompts["ft-1"])))
    # ft-2 finds both segments cached by ft-1; the LoRA model (delta on layer 0) shares nothing.
    assert tables["ft-2"][0][:full] == tables["base-1"][0][:full]
    assert tables["ft-2"][1][:full] == tables["ft-1"][1][:full]
    assert not set(tables["lora-1"][0]) & set(tables["base-1"][0])
    sharing = manager.sharing
    # Tokens found per segment: ft-1 (5 pages in segment 0), ft-2 (5 + 5).
    assert sharing.hits == [2 * full * PAGE, full * PAGE]
    # Of those, ft-1's segment-0 pages lay beyond where its computation started (token 0).
    assert sharing.shared_beyond_start == [full * PAGE, 0]
    # Whole-model prefix hits (computation skipped): only ft-2.
    assert manager.prefix_stats.hits == full * PAGE
    assert engine.stats().cross_model_kv_hits == full * PAGE
    assert engine.stats().num_free_pages == engine.stats().num_total_pages


def test_segments_change_no_output_under_concurrency(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    base_dir, zoo = four_layer_zoo(tmp_path, tiny_model_factory)
    zoo.register("acme", "ft", fine_tune_top_layers(base_dir, tmp_path / "ft", layers=[3], seed=6))
    chains = {n: zoo.load_chain(zoo.resolve("acme", n), torch.float32) for n in ("base", "ft")}
    tokenizer = load_tokenizer(base_dir)
    settings = Settings(kv_cache_memory=16 << 20, page_size=PAGE, max_num_batched_tokens=24, max_num_seqs=8)
    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(5, 500, (3 * PAGE + 3,), generator=gen).tolist()
    prompts = [shared + torch.randint(5, 500, (i,), generator=gen).tolist() for i in range(1, 9)]

    def serve(segments: KVSegments | None) -> tuple[dict[str, list[int]], LLMEngine]:
        engine = LLMEngine(chains["base"], tokenizer, settings, kv_segments=segments)
        for i, p in enumerate(prompts):
            engine.add_request(p, PARAMS, request_id=str(i), chain=chains[("base", "ft")[i % 2]])
        return finish_all(engine), engine

    whole, _ = serve(None)
    # All at once with chunked prefill (24-token budget): sharing happens across steps, and a
    # request's positions below its write floor must not be written again.
    cut, engine = serve(KVSegments.cut_at(4, [3]))
    assert cut == whole
    assert engine.kv_manager.sharing.shared_beyond_start[0] > 0
    assert engine.stats().num_free_pages == engine.stats().num_total_pages


def test_cuts_come_from_where_the_models_of_a_base_diverge(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    base_dir, zoo = four_layer_zoo(tmp_path, tiny_model_factory)
    assert kv_cuts(zoo, "base", max_segments=4) == []
    zoo.register("acme", "top2", fine_tune_top_layers(base_dir, tmp_path / "a", layers=[2, 3], seed=1))
    zoo.register("acme", "top2b", fine_tune_top_layers(base_dir, tmp_path / "b", layers=[2, 3], seed=2))
    zoo.register("acme", "top1", fine_tune_top_layers(base_dir, tmp_path / "c", layers=[3], seed=3))
    zoo.register(
        "acme", "lora", make_adapter(base_dir, tmp_path / "d", {"r": 2, "target_modules": ["q_proj"]}, 4)
    )
    assert divergence_counts(zoo, "base") == {2: 2, 3: 1, 0: 1}
    assert kv_cuts(zoo, "base", max_segments=4) == [2, 3]
    assert kv_cuts(zoo, "base", max_segments=2) == [2]  # the cut most models share
    assert kv_cuts(zoo, "base", max_segments=1) == []
    assert (
        first_divergent_layer(zoo.resolve("acme", "base").entries, zoo.resolve("acme", "top1").entries) == 3
    )
