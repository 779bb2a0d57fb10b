"""Random-weight Hugging Face checkpoints for tests, the demo and benchmarks.

Nothing can be downloaded here, so models are built from their `transformers` config with random
weights and saved with `save_pretrained`, next to a small byte-level BPE tokenizer trained on a
built-in corpus. Weights use a larger standard deviation than a trained model's initialisation so that
logits are peaked: greedy decoding then has clear winners, and comparisons against `transformers` are
not decided by rounding noise between near-tied tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

Arch = Literal["llama", "mistral", "qwen2", "qwen3"]
ARCHS: tuple[Arch, ...] = ("llama", "mistral", "qwen2", "qwen3")

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)

# transformers' AutoTokenizer rebuilds any qwen2 checkpoint's tokenizer as `Qwen2Tokenizer`, with this
# regex, NFC and an `unk_token` it adds when missing. Using the same pieces for every architecture keeps
# the ids identical however a folder is loaded.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A zoo keeps many animals, and a block zoo keeps many blocks.
Once upon a time there was a small model that wanted to learn how to speak. It read every book it found.
Large language models are served to many tenants at once. Each tenant has its own fine-tuned model,
but most of their layers are the same as the base model, so the server stores each layer only once.
The scheduler gives every step a budget of tokens. Long prompts are split into chunks and fused with
the decodes of other requests, so the batch stays full and no request waits too long for its first token.
Keys and values are cached in pages of sixteen tokens. When memory runs out, a request is preempted and
its pages are swapped to host memory, then swapped back in when there is room again.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Please write a short poem about the sea. The sea is wide, the sea is deep, the sea sings the sailors to sleep.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14159 2.71828 -1 1e-6 65535 2024-05-17 12:30:45
def add(a: int, b: int) -> int:
    return a + b

for i in range(10):
    print(f"step {i}: loss={1.0 / (i + 1):.3f}")
{"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}
SELECT id, name FROM blocks WHERE kind = 'layer' ORDER BY id LIMIT 10;
Le renard brun rapide saute par-dessus le chien paresseux. Où est la bibliothèque ? Très bien, merci.
Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München, schöne Straße, Größe.
El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la estación? ¡Mañana será otro día!
A raposa marrom rápida pula sobre o cão preguiçoso. Não, obrigado. Ação e coração.
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, как дела? Спасибо, хорошо.
Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο. Καλημέρα κόσμε.
敏捷的棕色狐狸跳过了懒狗。你好，世界！今天天气很好。我们一起学习语言模型。
素早い茶色の狐がのろまな犬を飛び越える。こんにちは、世界。ありがとうございます。
빠른 갈색 여우가 게으른 개를 뛰어넘는다. 안녕하세요, 세계.
الثعلب البني السريع يقفز فوق الكلب الكسول. مرحبا بالعالم.
השועל החום המהיר קופץ מעל הכלב העצלן. שלום עולם.
तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है। नमस्ते दुनिया।
Emoji: 🙂 🚀 🦊 🐶 ✨ 👍🏽 — “quotes”, ‘single’, « guillemets », naïve café, coöperate, résumé.
"""


def _publish(target: Path, write: Callable[[Path], object]) -> None:
    """Run `write` on a fresh sibling folder, then rename that to `target`: no reader sees half a build."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(staging)
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
        # Another process published the same build first; its copy is as good as ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,  # byte-level BPE never needs one, see PRETOKENIZE_REGEX
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tokenizer(cache_dir: Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """The BPE tokenizer of `vocab_size` entries, trained once and then loaded from under `cache_dir`."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must cover the 256 bytes and the special tokens, got {vocab_size}")
    target = cache_dir / f"bpe-{vocab_size}"
    if not target.exists():
        _publish(target, lambda staging: _train_tokenizer(vocab_size).save_pretrained(staging))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(target)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{target} does not hold a fast tokenizer")
    return tokenizer


def _config_and_class(arch: Arch) -> tuple[Callable[..., PretrainedConfig], type[PreTrainedModel]]:
    match arch:
        case "llama":
            return LlamaConfig, LlamaForCausalLM
        case "mistral":
            return MistralConfig, MistralForCausalLM
        case "qwen2":
            return Qwen2Config, Qwen2ForCausalLM
        case "qwen3":
            return Qwen3Config, Qwen3ForCausalLM
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


def _rope_parameters(rope_scaling: dict[str, Any] | None, rope_theta: float) -> dict[str, Any]:
    """transformers 5 keeps theta and any scaling together in `config.rope_parameters`."""
    params: dict[str, Any] = {"rope_type": "default"}
    if rope_scaling is not None:
        params = dict(rope_scaling)
        if "rope_type" not in params:
            if "type" not in params:
                raise ValueError(f"rope_scaling needs a 'rope_type': {rope_scaling}")
            params["rope_type"] = params.pop("type")
    params.setdefault("rope_theta", rope_theta)
    return params


@torch.no_grad()
def _init_weights(model: nn.Module, std: float, generator: torch.Generator) -> None:
    """Linear and embedding tensors ~ N(0, std); every other parameter is a norm scale and stays 1."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear | nn.Embedding):
                param.normal_(0.0, std, generator=generator)
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                raise TypeError(f"no initialisation rule for {type(module).__name__}.{name}")


def build_tiny_model(
    path: Path,
    arch: Arch,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    tie_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 2048,
    sliding_window: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    init_std: float = 0.2,
    tokenizer_dir: Path | None = None,
    tokenizer_vocab_size: int = 512,
) -> Path:
    """Save a random-weight `arch` checkpoint plus tokenizer into `path` and return `path`.

    `vocab_size` defaults to the tokenizer's size; a larger one adds ids the tokenizer never produces.
    `tokenizer_dir` is a cache for `build_tokenizer`; without it the tokenizer is trained afresh.
    `sliding_window` applies to mistral only, whose window is otherwise off.
    """
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if sliding_window is not None and arch != "mistral":
        raise ValueError(f"sliding_window is only supported for mistral, not {arch}")
    if tokenizer_dir is None:
        tokenizer = _train_tokenizer(tokenizer_vocab_size)
    else:
        tokenizer = build_tokenizer(tokenizer_dir, tokenizer_vocab_size)
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")

    config_cls, model_cls = _config_and_class(arch)
    extra: dict[str, Any] = {"sliding_window": sliding_window} if arch == "mistral" else {}
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_embeddings,
        rope_parameters=_rope_parameters(rope_scaling, rope_theta),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    # Construction draws from torch's global RNG; fork it so callers' random streams are untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        _init_weights(model, init_std, torch.Generator().manual_seed(seed))
    nn.Module.to(model, dtype=dtype)  # in place; transformers' override of `to` defeats mypy
    shard: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **shard)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(path)
    return path


def build_llama_100m(
    path: Path,
    *,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Path:
    """A Llama of about 99.5M parameters (32000 vocab, 8 layers of width 768) for benchmarks."""
    return build_tiny_model(
        path,
        "llama",
        hidden_size=768,
        num_layers=8,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        vocab_size=32000,
        seed=seed,
        dtype=dtype,
        max_shard_size=max_shard_size,
        # Keeps logits about as peaked as the tiny default (std * sqrt(hidden) ~ 1.4).
        init_std=0.05,
        tokenizer_dir=tokenizer_dir,
    )


class TinyModelCache:
    """Builds tiny models under `root`, each distinct argument set once; reuses finished builds on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, arch: Arch, **kwargs: Any) -> Path:
        """The folder of `build_tiny_model(folder, arch, **kwargs)`, building it on first use."""
        key = json.dumps({"arch": arch, **kwargs}, sort_keys=True, default=str)
        path = self.root / f"{arch}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        if (path / "config.json").exists():
            return path
        _publish(
            path,
            lambda staging: build_tiny_model(staging, arch, tokenizer_dir=self.root / "tokenizers", **kwargs),
        )
        return path
