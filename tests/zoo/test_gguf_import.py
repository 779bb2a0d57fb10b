"""GGUF import against `transformers` loading the same file: config, tokenizer, logits, greedy tokens.

Tiny llama and qwen2 files are written with the `gguf` package's writer (tests/zoo/gguf_files.py),
holding F32, F16, Q8_0, Q4_0 and Q4_1 tensors. Each is registered twice in one zoo: as imported
(Q4_0/Q4_1 as 4-bit blocks) and dequantized (every tensor dense fp32).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from blockzoo.settings import Settings
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.executor import ModelExecutor
from runtime.kv_tensors import KVTensors
from runtime.request import Request
from runtime.sampling_params import SamplingParams
from runtime.scheduler_output import ScheduledChunk, SchedulerOutput
from tests.zoo.gguf_files import TinySpec, write_tiny_gguf
from tests.zoo.zoo_helpers import add_tenant, open_zoo, store_files
from zoo.registry import Zoo

ARCHS = ("llama", "qwen2")
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\t\tand\n\nnewlines   \n",
    "Numbers: 3.14159, 2024-12-03, 1234567890 and 42nd",
    "call my_var = self.value_250 + 250.250",
    "Unicode: naïve café, 日本語のテキスト, Ελληνικά, emoji 🚀🔥, Ωmega",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code\n",
    "I'm sure they'll say it's fine; we've done it. DON'T SHOUT",
    "<|im_start|>user\nhi<|im_end|> <think>plain</think> <|endoftext|>",
    "",
]
CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2? Answer briefly."},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And   in words, ünïcode?"},
]


class Imported(NamedTuple):
    folder: Path
    name: str
    zoo: Zoo
    reference: Any


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Imported]]:
    root = tmp_path_factory.mktemp("gguf")
    zoo = open_zoo(root / "zoo")
    out: dict[str, Imported] = {}
    for arch in ARCHS:
        folder = root / arch
        folder.mkdir()
        write_tiny_gguf(folder / f"{arch}.gguf", TinySpec(arch), seed=len(arch))
        zoo.add_base(f"{arch}-q4", folder / f"{arch}.gguf")
        zoo.add_base(f"{arch}-fp32", folder / f"{arch}.gguf", dequantize=True)
        reference = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=f"{arch}.gguf", dtype=torch.float32
        )
        reference.eval()
        out[arch] = Imported(folder, f"{arch}.gguf", zoo, reference)
    yield out


def last_logits(chain: Chain, prompt: list[int]) -> torch.Tensor:
    kv = KVTensors(chain.config, 16, 16, torch.float32)
    request = Request("r", prompt, SamplingParams(temperature=0))
    request.page_table = list(range(-(-len(prompt) // 16)))
    out = ModelExecutor(chain, kv).execute(
        SchedulerOutput([ScheduledChunk(request, len(prompt), True)], [], 0)
    )
    return out.logits[0]


def tokenizers_of(item: Imported, model: str) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    ours = load_tokenizer(item.zoo.tokenizer_path(item.zoo.resolve(None, model)))
    theirs = AutoTokenizer.from_pretrained(item.folder, gguf_file=item.name)
    return ours, theirs


@pytest.mark.parametrize("arch", ARCHS)
def test_config_matches_transformers(arch: str, imported: dict[str, Imported]) -> None:
    item = imported[arch]
    ours = item.zoo.resolve(None, f"{arch}-q4").raw_config
    theirs = AutoConfig.from_pretrained(item.folder, gguf_file=item.name).to_dict()
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert ours[key] == theirs[key], key
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"]
    assert ours["head_dim"] == theirs.get("head_dim") or ours["hidden_size"] // ours["num_attention_heads"]
    assert ours["model_type"] == theirs["model_type"]
    # qwen2's q/k/v biases and untied head; llama's tied one.
    assert ours["tie_word_embeddings"] is (arch == "llama")


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_matches_transformers(arch: str, imported: dict[str, Imported]) -> None:
    ours, theirs = tokenizers_of(imported[arch], f"{arch}-q4")
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids)
    for generation_prompt in (True, False):
        kwargs: dict[str, Any] = {"add_generation_prompt": generation_prompt, "tokenize": False}
        text = str(ours.apply_chat_template(CONVERSATION, **kwargs))
        assert text == theirs.apply_chat_template(CONVERSATION, **kwargs)
        assert "You are tiny." in text
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        theirs.bos_token,
        theirs.eos_token,
        theirs.pad_token,
        theirs.unk_token,
    )


def _prompt(item: Imported) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(item.folder, gguf_file=item.name)
    return list(tokenizer("The quick brown fox, 42 times: naïve code()")["input_ids"])


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch: str, imported: dict[str, Imported]) -> None:
    item = imported[arch]
    prompt = _prompt(item)
    with torch.no_grad():
        expected = item.reference(torch.tensor([prompt])).logits[0, -1]
    dense = item.zoo.load_chain(item.zoo.resolve(None, f"{arch}-fp32"), torch.float32)
    assert torch.allclose(last_logits(dense, prompt), expected, atol=1e-4, rtol=1e-4)
    packed = item.zoo.load_chain(item.zoo.resolve(None, f"{arch}-q4"), torch.float32)
    ours = last_logits(packed, prompt)
    # The 4-bit chain holds the same weights; its kernel computes in lower precision.
    error = (ours - expected).abs().max() / expected.abs().max()
    assert error < 2e-2, error
    assert int(ours.argmax()) == int(expected.argmax())


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_dequantized_fp32(arch: str, imported: dict[str, Imported]) -> None:
    item = imported[arch]
    prompt = _prompt(item)
    chain = item.zoo.load_chain(item.zoo.resolve(None, f"{arch}-fp32"), torch.float32)
    tokenizer = load_tokenizer(item.zoo.tokenizer_path(item.zoo.resolve(None, f"{arch}-fp32")))
    engine = LLMEngine(chain, tokenizer, Settings(kv_cache_memory=16 << 20))
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), request_id="g")
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.token_ids
    item.reference.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = item.reference.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
        )
    assert tokens == ref[0, len(prompt) :].tolist()


def test_same_file_twice_stores_nothing_new(imported: dict[str, Imported]) -> None:
    item = imported["llama"]
    before = store_files(item.zoo)
    report = item.zoo.add_base("llama-q4-again", item.folder / item.name)
    assert report.blocks_new == 0 and report.bytes_new == 0
    assert store_files(item.zoo) == before
    assert item.zoo.resolve(None, "llama-q4-again").entries == item.zoo.resolve(None, "llama-q4").entries


def test_gguf_fine_tune_registers_on_its_base(imported: dict[str, Imported]) -> None:
    item = imported["qwen2"]
    zoo = item.zoo
    add_tenant(zoo, "acme")
    report = zoo.register("acme", "tuned", item.folder / item.name, base="qwen2-q4")
    assert (report.kind, report.base, report.blocks_new) == ("full", "qwen2-q4", 0)
    tuned = zoo.resolve("acme", "tuned")
    base = zoo.resolve(None, "qwen2-q4")
    assert tuned.entries == base.entries and tuned.tokenizer_id == base.tokenizer_id


@pytest.mark.parametrize(("add_bos", "add_eos"), [(True, None), (True, True), (False, True)])
def test_bos_and_eos_flags_match_transformers(add_bos: bool, add_eos: bool | None, tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "t.gguf", TinySpec("llama"), add_bos=add_bos, add_eos=add_eos)
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("t", path, dequantize=True)
    ours = load_tokenizer(zoo.tokenizer_path(zoo.resolve(None, "t")))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in ("hello world", "", "<|im_start|>x"):
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    ids = ours("hello")["input_ids"]
    assert (ids[0] == ours.bos_token_id) is add_bos and (ids[-1] == ours.eos_token_id) is bool(add_eos)
