"""A GGUF file's metadata as a Hugging Face `config.json` dict, the way `transformers` derives it.

The keys are llama.cpp's (`llama.embedding_length`, `qwen2.attention.head_count_kv`, …). The mapping
follows `transformers`' GGUF loader so that the zoo and the oracle see the same architecture:
`rope.dimension_count` is the head dim for llama (qwen2 ignores it), the vocabulary size is the
arch's `vocab_size` or else the token count, and the embeddings are tied when `output.weight` is
absent. What the runtime cannot run the same way (rope scaling, partial rotary) is refused by name.
"""

from __future__ import annotations

from typing import Any

from runtime.errors import BlockZooError
from runtime.model_config import ModelConfig
from zoo.gguf_file import GGUFContents, GGUFError

# GGUF architecture → (HF architecture, model_type); llama.cpp writes Mistral as llama.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
_MAX_CONTEXT = 1 << 24


def gguf_architecture(metadata: dict[str, Any]) -> str:
    """The GGUF architecture name, refused by name when the zoo cannot run it."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("GGUF metadata has no general.architecture")
    if arch not in ("llama", "qwen2"):
        raise GGUFError(f"GGUF architecture {arch[:64]!r} is not supported (only llama and qwen2)")
    return arch


def _int(
    metadata: dict[str, Any], key: str, default: int | None = None, low: int = 1, high: int = 1 << 20
) -> int:
    value = metadata.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"GGUF metadata {key} is missing or not an integer")
    if not low <= value <= high:
        raise GGUFError(f"GGUF metadata {key} = {value} is out of range [{low}, {high}]")
    return value


def _float(metadata: dict[str, Any], key: str, default: float) -> float:
    value = metadata.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < float(value) < 1e12:
        raise GGUFError(f"GGUF metadata {key} = {value!r} is not a positive number")
    return float(value)


def _token_id(metadata: dict[str, Any], name: str, vocab: int) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{name}_token_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise GGUFError(f"GGUF tokenizer.ggml.{name}_token_id = {value!r} is outside the vocabulary")
    return value


def gguf_raw_config(contents: GGUFContents) -> dict[str, Any]:
    """The HF config dict of the model in `contents` (checked by `ModelConfig.from_hf_dict`)."""
    md = contents.metadata
    arch = gguf_architecture(md)
    name = str(md.get("general.name", ""))
    hf_name = "mistral" if arch == "llama" and "mistral" in name.lower() else arch
    architecture, model_type = ARCHITECTURES[hf_name]
    for key in md:
        if key.startswith(f"{arch}.rope.scaling.") and key != f"{arch}.rope.scaling.finetuned":
            kind = md.get(f"{arch}.rope.scaling.type", "none")
            if kind != "none":
                raise GGUFError(f"GGUF rope scaling {str(kind)[:32]!r} is not supported")
    if "rope_freqs.weight" in contents.tensors:
        raise GGUFError("GGUF rope frequency factors (rope_freqs.weight, Llama 3.1 style) are not supported")
    hidden = _int(md, f"{arch}.embedding_length")
    heads = _int(md, f"{arch}.attention.head_count", high=4096)
    kv_heads = _int(md, f"{arch}.attention.head_count_kv", default=heads, high=4096)
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError("GGUF metadata has no tokenizer.ggml.tokens")
    vocab = _int(md, f"{arch}.vocab_size", default=len(tokens), high=1 << 22)
    head_dim = hidden // heads
    rotary = md.get(f"{arch}.rope.dimension_count")
    if arch == "llama" and rotary is not None:
        head_dim = _int(md, f"{arch}.rope.dimension_count", high=4096)
    elif rotary is not None and rotary != head_dim:
        raise GGUFError(f"GGUF {arch}.rope.dimension_count {rotary} (partial rotary) is not supported")
    raw: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": _int(md, f"{arch}.block_count", high=1024),
        "intermediate_size": _int(md, f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _float(md, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _float(md, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": _int(md, f"{arch}.context_length", default=4096, high=_MAX_CONTEXT),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in contents.tensors,
        "hidden_act": "silu",
        "bos_token_id": _token_id(md, "bos", len(tokens)),
        "eos_token_id": _token_id(md, "eos", len(tokens)),
        "pad_token_id": _token_id(md, "padding", len(tokens)),
        "torch_dtype": "float32",
    }
    if len(tokens) > vocab:
        raise GGUFError(f"GGUF tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab}")
    try:
        ModelConfig.from_hf_dict(raw)
    except BlockZooError as exc:
        raise GGUFError(f"GGUF metadata does not describe a runnable model: {exc}") from exc
    return raw
