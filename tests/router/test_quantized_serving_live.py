"""4-bit serving through the live API: a quantized twin by name, and adapters on 4-bit base blocks."""

from __future__ import annotations

from pathlib import Path

import openai
import torch

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.app import create_app
from router.auth import admin_key_digest
from router.inference import InferenceService
from router.services import Services
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.sampling_params import SamplingParams
from tests.router.live_server import serve
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, open_zoo
from zoo.quantize import QuantizeOptions
from zoo.registry import Zoo


def _offline(zoo: Zoo, model: str, quantization: str | None, base: Path, prompt: list[int]) -> str:
    chain = zoo.load_chain(zoo.resolve("acme", model), torch.float32, quantization=quantization)
    engine = LLMEngine(chain, load_tokenizer(base), Settings(kv_cache_memory=8 << 20))
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), request_id="x")
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.text
    return text


def test_quantized_models_served_over_the_openai_api(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    base = tiny_model_factory("llama", hidden_size=128, intermediate_size=256, init_std=0.05)
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("tiny", base)
    key = add_tenant(zoo, "acme")
    zoo.register(
        "acme", "ad", make_adapter(base, tmp_path / "ad", {"r": 8, "target_modules": ["q_proj", "o_proj"]}, 3)
    )
    options = QuantizeOptions(group_size=32, method="gptq")
    twin = zoo.quantize(None, "tiny", options).model
    settings = Settings(
        data_dir=tmp_path / "data", kv_cache_memory=16 << 20, page_size=8, weights_quantization=options.label
    )
    inference = InferenceService(settings, zoo)
    app = create_app(Services(settings, zoo, admin_key_digest("admin-secret")), inference)
    prompt = [3, 17, 42, 99, 7, 250, 11]
    with serve(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert {twin, "tiny", "ad"} <= {m.id for m in client.models.list().data}
        got = {
            model: client.completions.create(
                model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
            for model in ("ad", twin)
        }
    # Under the setting the adapter runs on the 4-bit base blocks: the server gives what the offline
    # engine gives for that chain (whose layers are 4-bit, adapter on top).
    quantized_chain = zoo.load_chain(zoo.resolve("acme", "ad"), torch.float32, quantization=options.label)
    assert all(layer.quantized for layer in quantized_chain.layers)
    assert all(quantized_chain.delta_for(i) is not None for i in range(quantized_chain.num_layers))
    assert got["ad"] == _offline(zoo, "ad", options.label, base, prompt)
    assert got[twin] == _offline(zoo, twin, None, base, prompt)
    assert got["ad"] and got[twin]
    # This prompt tells the two apart, so a server that ignored the setting would fail above.
    assert _offline(zoo, "ad", None, base, prompt) != got["ad"]
