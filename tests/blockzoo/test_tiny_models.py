from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from blockzoo.tiny_models import (
    ARCHS,
    BOS,
    EOS,
    IM_END,
    IM_START,
    PAD,
    Arch,
    TinyModelCache,
    build_llama_100m,
    build_tiny_model,
    build_tokenizer,
)

TEXT = "Hello, wörld! Ça va? 你好，世界。 Привет 🦊🚀  two  spaces\n\tand 12345 digits"
EXPECTED_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_loads_back_with_transformers(tiny_model_factory: TinyModelCache, arch: Arch) -> None:
    folder = tiny_model_factory(arch)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == EXPECTED_CLASS[arch]
    assert model.config.num_hidden_layers == 2
    assert model.config.hidden_size == 64
    assert model.config.num_key_value_heads == 2
    assert model.config.head_dim == 16
    assert model.config.vocab_size == len(tokenizer) == 512
    assert model.config.bos_token_id == tokenizer.convert_tokens_to_ids(BOS)
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids(EOS)
    assert model.config.pad_token_id == tokenizer.convert_tokens_to_ids(PAD)
    # However transformers picks the tokenizer class for this model type, ids must be the shared ones.
    reference = build_tokenizer(tiny_model_factory.root / "tokenizers")
    assert tokenizer(TEXT).input_ids == reference(TEXT).input_ids

    input_ids = torch.tensor([tokenizer("The quick brown fox").input_ids])
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], 512)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_reinitialised(tiny_model_factory: TinyModelCache, arch: Arch) -> None:
    tensors = _tensors(tiny_model_factory(arch))
    norms = {name: t for name, t in tensors.items() if "norm" in name}
    others = {name: t for name, t in tensors.items() if "norm" not in name}
    assert norms and all(torch.equal(t, torch.ones_like(t)) for t in norms.values())
    for name, t in others.items():
        assert 0.15 < t.float().std().item() < 0.25, name
    biases = [name for name in tensors if name.endswith("bias")]
    if arch == "qwen2":
        assert sorted({name.rsplit(".", 2)[-2] for name in biases}) == ["k_proj", "q_proj", "v_proj"]
    else:
        assert biases == []


def test_same_seed_same_weights_and_global_rng_untouched(tmp_path: Path) -> None:
    tokenizers = tmp_path / "tok"
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = _tensors(build_tiny_model(tmp_path / "a", "llama", seed=7, tokenizer_dir=tokenizers))
    assert torch.equal(torch.rand(3), expected_draw)
    again = _tensors(build_tiny_model(tmp_path / "b", "llama", seed=7, tokenizer_dir=tokenizers))
    other = _tensors(build_tiny_model(tmp_path / "c", "llama", seed=8, tokenizer_dir=tokenizers))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[q_proj], other[q_proj])


def test_tied_embeddings(tiny_model_factory: TinyModelCache) -> None:
    tied = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", tie_embeddings=True))
    untied = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    assert tied.config.tie_word_embeddings
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert not untied.config.tie_word_embeddings
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_sharded_checkpoint(tiny_model_factory: TinyModelCache) -> None:
    folder = tiny_model_factory("qwen2", max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    sharded, whole = _tensors(folder), _tensors(tiny_model_factory("qwen2"))
    assert sharded.keys() == whole.keys() == index["weight_map"].keys()
    assert all(torch.equal(sharded[k], whole[k]) for k in whole)


def test_bfloat16_checkpoint(tiny_model_factory: TinyModelCache) -> None:
    folder = tiny_model_factory("qwen3", dtype=torch.bfloat16)
    assert {t.dtype for t in _tensors(folder).values()} == {torch.bfloat16}
    assert AutoConfig.from_pretrained(folder).dtype == torch.bfloat16


def test_rope_scaling_reaches_the_model(tiny_model_factory: TinyModelCache) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    scaled = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", rope_scaling=scaling))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    assert scaled.config.rope_parameters["rope_type"] == "llama3"
    assert scaled.config.rope_parameters["factor"] == 8.0
    assert plain.config.rope_parameters["rope_type"] == "default"
    scaled_freq, plain_freq = scaled.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq
    # llama3 scaling keeps the highest frequencies and divides the lowest by `factor`.
    assert torch.allclose(scaled_freq[0], plain_freq[0])
    assert torch.allclose(scaled_freq[-1], plain_freq[-1] / 8.0)


def test_mistral_sliding_window(tiny_model_factory: TinyModelCache, tmp_path: Path) -> None:
    assert AutoConfig.from_pretrained(tiny_model_factory("mistral")).sliding_window is None
    assert AutoConfig.from_pretrained(tiny_model_factory("mistral", sliding_window=8)).sliding_window == 8
    with pytest.raises(ValueError, match="sliding_window"):
        build_tiny_model(tmp_path, "llama", sliding_window=8)


def test_vocab_larger_than_tokenizer(tiny_model_factory: TinyModelCache, tmp_path: Path) -> None:
    tensors = _tensors(tiny_model_factory("llama", vocab_size=600))
    assert tensors["model.embed_tokens.weight"].shape == (600, 64)
    assert tensors["lm_head.weight"].shape == (600, 64)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(tmp_path, "llama", vocab_size=100)


def test_tokenizer_round_trip_and_special_tokens(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path)
    assert len(tokenizer) == 512
    ids = tokenizer(TEXT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) < len(TEXT.encode())  # merges were learned, not just bytes
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    for token in (BOS, EOS, PAD, IM_START, IM_END):
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(token)) == token
    assert len(build_tokenizer(tmp_path, vocab_size=300)) == 300


def test_tokenizer_is_trained_once_per_cache_dir(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    stamp = (tmp_path / "bpe-512" / "tokenizer.json").stat().st_mtime_ns
    build_tokenizer(tmp_path)
    assert (tmp_path / "bpe-512" / "tokenizer.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe-512"]


def test_chat_template_renders(tiny_model_factory: TinyModelCache) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory("llama"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est Paris?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nOù est Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_END)) == 2


def test_cache_reuses_equal_arguments(tmp_path: Path) -> None:
    cache = TinyModelCache(tmp_path)
    first = cache("llama", num_layers=1)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert cache("llama", num_layers=1) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert cache("llama", num_layers=1, seed=1) != first
    assert TinyModelCache(tmp_path)("llama", num_layers=1) == first  # a new cache finds it on disk


def test_llama_100m_preset(tmp_path: Path) -> None:
    folder = build_llama_100m(tmp_path / "m", dtype=torch.bfloat16, tokenizer_dir=tmp_path / "tok")
    config = AutoConfig.from_pretrained(folder)
    assert config.vocab_size == 32000
    num_params = sum(t.numel() for t in _tensors(folder).values())
    assert 90e6 < num_params < 110e6
