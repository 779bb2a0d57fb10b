"""The real file: SmolLM2-135M-Instruct's GGUF maps to the config and tokenizer `transformers` derives.

`smollm2_hf_dir()` holds what transformers made of the same file (its config.json and tokenizer,
saved once); only the metadata is read here, so the test stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from blockzoo.smollm2 import smollm2_gguf, smollm2_hf_dir
from runtime.checkpoint_loader import load_tokenizer
from zoo.gguf_config import gguf_raw_config
from zoo.gguf_file import read_gguf
from zoo.gguf_tokenizer import write_tokenizer

TEXTS = [
    "What is the capital of France?",
    "  Numbers 1234567 and 3.5%, dates 2024-12-03\n\n\tcode: def f(x): return x**2",
    "Unicode: naïve café, 日本語, emoji 🚀 — ΩMEGA",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And   of Italy?"},
]


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    contents = read_gguf(smollm2_gguf())
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    write_tokenizer(contents.metadata, folder)
    return gguf_raw_config(contents), folder


def test_real_config_matches_transformers(mapped: tuple[dict[str, Any], Path]) -> None:
    ours, _ = mapped
    theirs = json.loads((smollm2_hf_dir() / "config.json").read_text())
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
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
    assert (ours["num_hidden_layers"], ours["hidden_size"], ours["vocab_size"]) == (30, 576, 49152)


def test_real_tokenizer_matches_transformers(mapped: tuple[dict[str, Any], Path]) -> None:
    _, folder = mapped
    ours = load_tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    for generation_prompt in (True, False):
        kwargs: dict[str, Any] = {"add_generation_prompt": generation_prompt, "tokenize": False}
        text = str(ours.apply_chat_template(CONVERSATION, **kwargs))
        assert text == theirs.apply_chat_template(CONVERSATION, **kwargs)
        assert "You are a helpful AI assistant named SmolLM" in text
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        theirs.bos_token,
        theirs.eos_token,
        theirs.pad_token,
    )
