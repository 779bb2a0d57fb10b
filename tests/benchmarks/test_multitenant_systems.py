"""The multitenant benchmark's systems serve the same requests with the same outputs, and count weights right."""

from __future__ import annotations

import random
from pathlib import Path

from safetensors.torch import load_file

from benchmarks.multitenant_systems import ModelRequest, run_blockzoo, run_hf_peft
from benchmarks.workload import BenchRequest
from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, fine_tune_top_layers, open_zoo
from zoo.kv_layout import kv_cuts


def test_every_system_gives_the_same_tokens(tmp_path: Path, tiny_model_factory: TinyModelCache) -> None:
    base = tiny_model_factory("llama", num_layers=3)
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("base", base)
    add_tenant(zoo, "acme")
    adapters = {
        "lora-a": make_adapter(base, tmp_path / "a", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, 1),
        "lora-b": make_adapter(base, tmp_path / "b", {"r": 8, "target_modules": ["up_proj", "o_proj"]}, 2),
    }
    full = {"ft": fine_tune_top_layers(base, tmp_path / "ft", layers=[2], seed=3)}
    for name, folder in {**adapters, **full}.items():
        zoo.register("acme", name, folder)
    owners: dict[str, str | None] = {"base": None, "lora-a": "acme", "lora-b": "acme", "ft": "acme"}
    rng = random.Random(0)
    requests = [
        ModelRequest(
            rng.choice(list(owners)),
            BenchRequest([rng.randrange(5, 500) for _ in range(rng.randint(3, 12))], rng.randint(2, 9)),
        )
        for _ in range(16)
    ]
    settings = Settings(dtype="float32", kv_cache_memory=16 << 20, page_size=8)
    cuts = kv_cuts(zoo, "base", settings.max_kv_segments)
    assert cuts == [2]
    shared = run_blockzoo(zoo, owners, "base", base, requests, settings, cuts, "a", lambda _: None)
    unshared = settings.model_copy(update={"per_block_batching": False})
    alone = run_blockzoo(zoo, owners, "base", base, requests, unshared, [], "c", lambda _: None)
    hf = run_hf_peft(base, adapters, full, "base", requests, lambda _: None)
    assert [len(t) for t in shared.tokens] == [r.request.output_len for r in requests]
    assert shared.tokens == alone.tokens == hf.tokens
    # BlockZoo holds each distinct block once (the base's, and the fine-tune's own top layer) plus
    # the adapters; transformers holds the base with the adapters and the whole fine-tune besides.
    weights = load_file(str(base / "model.safetensors"))
    total = sum(t.numel() * 4 for t in weights.values())
    top = sum(t.numel() * 4 for n, t in weights.items() if n.startswith("model.layers.2."))
    assert total + top < shared.peak_weight_bytes < total + top + (1 << 20)
    assert shared.peak_weight_bytes == alone.peak_weight_bytes
    assert hf.peak_weight_bytes > 2 * total
