"""Small GGUF files written with the `gguf` package's own writer, as llama.cpp's converter lays them out.

A tiny llama (q/k rows permuted for llama.cpp's rope, tied embeddings) and a tiny qwen2 (q/k/v
biases, an untied head), each with a byte-level BPE vocabulary trained here with `tokenizers`,
its merges, token types, special token ids and a chat template, and tensors of every type the
importer handles: F32, F16, Q8_0, Q4_0 and Q4_1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape, quantize
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from blockzoo.tiny_models import CORPUS

Q = GGMLQuantizationType
CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
USER_DEFINED = ("<think>",)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGUF pre-tokenizer name and the split it stands for, per architecture.
PRE = {"llama": ("llama-bpe", _LLAMA3_SPLIT), "qwen2": ("qwen2", _QWEN2_SPLIT)}
# The type of each layer's projections: every type appears, and Q4_0/Q4_1 on q/k (permuted rows).
LAYER_TYPES: list[dict[str, Q]] = [
    {p: Q.Q4_1 for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")},
    {
        "attn_q": Q.Q4_0,
        "attn_k": Q.Q4_0,
        "attn_v": Q.F16,
        "attn_output": Q.Q8_0,
        "ffn_gate": Q.Q4_1,
        "ffn_up": Q.F32,
        "ffn_down": Q.Q4_0,
    },
    {
        "attn_q": Q.F32,
        "attn_k": Q.Q8_0,
        "attn_v": Q.Q4_1,
        "attn_output": Q.Q4_0,
        "ffn_gate": Q.F16,
        "ffn_up": Q.Q4_1,
        "ffn_down": Q.Q8_0,
    },
]


class TinySpec(NamedTuple):
    arch: str
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 384
    eps: float = 1e-5
    theta: float = 50000.0
    context: int = 512


def train_tokenizer(arch: str, vocab: int) -> Tokenizer:
    """A byte-level BPE vocabulary with the split the GGUF's `tokenizer.ggml.pre` will name."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE[arch][1]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[*CONTROL, *USER_DEFINED],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Numbers and code in the corpus give merges across digits and punctuation, where the splits of
    # different pre-tokenizers tell apart (a wrong choice then changes the tokens).
    extra = [f"{n} {n * 7} {n * 31}, 2024-12-{n % 28:02d} my_var = self.value_{n}\n" for n in range(100, 400)]
    tokenizer.train_from_iterator([*CORPUS.splitlines(keepends=True), *extra], trainer=trainer)
    return tokenizer


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order: each head's two rotary halves interleaved."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _random_blocks(shape: tuple[int, ...], qtype: Q) -> np.ndarray:
    """Blocks of `qtype` gguf cannot quantize to: Q6_K with random codes and sub-scales and a small
    fp16 scale (its last two bytes), any other type all zeros."""
    data = np.zeros(quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    if qtype == Q.Q6_K:
        blocks = data.reshape(-1, 210)
        blocks[:] = np.random.default_rng(0).integers(0, 256, blocks.shape, dtype=np.uint8)
        blocks[:, 208:] = np.full(len(blocks), 0.0005, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    return data


def _add(writer: GGUFWriter, name: str, weight: np.ndarray, qtype: Q) -> None:
    if qtype == Q.F32:
        writer.add_tensor(name, weight.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, weight.astype(np.float16))
    else:
        try:
            data = quantize(weight.astype(np.float32), qtype)
        except NotImplementedError:  # a type gguf cannot write: bytes of the right size
            data = _random_blocks(weight.shape, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)


def write_tiny_gguf(
    path: Path,
    spec: TinySpec,
    seed: int = 0,
    layer_types: list[dict[str, Q]] | None = None,
    chat_template: str = CHAT_TEMPLATE,
    tokenizer_model: str = "gpt2",
    pre: str | None = None,
    add_bos: bool = False,
    add_eos: bool | None = None,
) -> Path:
    """Write a tiny `spec.arch` model to `path` as llama.cpp's converter would."""
    arch = spec.arch
    types = layer_types or LAYER_TYPES
    tokenizer = train_tokenizer(arch, spec.vocab)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (torch.randn(*shape, generator=gen) * scale).numpy()

    head_dim = spec.hidden // spec.heads
    kv = spec.kv_heads * head_dim
    vocab = len(tokens)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_uint32(f"{arch}.block_count", len(types))
    writer.add_uint32(f"{arch}.context_length", spec.context)
    writer.add_uint32(f"{arch}.embedding_length", spec.hidden)
    writer.add_uint32(f"{arch}.feed_forward_length", spec.intermediate)
    writer.add_uint32(f"{arch}.attention.head_count", spec.heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", spec.kv_heads)
    writer.add_float32(f"{arch}.rope.freq_base", spec.theta)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", spec.eps)
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    if arch == "llama":
        writer.add_uint32(f"{arch}.vocab_size", vocab)
    writer.add_string("tokenizer.ggml.model", tokenizer_model)
    writer.add_string("tokenizer.ggml.pre", pre or PRE[arch][0])
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array(
        "tokenizer.ggml.token_type", [3 if t in CONTROL else 4 if t in USER_DEFINED else 1 for t in tokens]
    )
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", tokens.index("<|im_start|>"))
    writer.add_uint32("tokenizer.ggml.eos_token_id", tokens.index("<|im_end|>"))
    writer.add_uint32("tokenizer.ggml.unknown_token_id", tokens.index("<|endoftext|>"))
    writer.add_uint32("tokenizer.ggml.padding_token_id", tokens.index("<|endoftext|>"))
    writer.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    if add_eos is not None:
        writer.add_bool("tokenizer.ggml.add_eos_token", add_eos)
    writer.add_string("tokenizer.chat_template", chat_template)

    _add(
        writer, "token_embd.weight", rand(vocab, spec.hidden, scale=0.5), Q.Q8_0 if arch == "llama" else Q.F16
    )
    shapes = {
        "attn_q": (spec.hidden, spec.hidden),
        "attn_k": (kv, spec.hidden),
        "attn_v": (kv, spec.hidden),
        "attn_output": (spec.hidden, spec.hidden),
        "ffn_gate": (spec.intermediate, spec.hidden),
        "ffn_up": (spec.intermediate, spec.hidden),
        "ffn_down": (spec.hidden, spec.intermediate),
    }
    for i, layer in enumerate(types):
        _add(writer, f"blk.{i}.attn_norm.weight", 1 + rand(spec.hidden, scale=0.1), Q.F32)
        _add(writer, f"blk.{i}.ffn_norm.weight", 1 + rand(spec.hidden, scale=0.1), Q.F32)
        for proj, shape in shapes.items():
            weight = rand(*shape)
            if arch == "llama" and proj in ("attn_q", "attn_k"):
                weight = llama_cpp_permute(weight, spec.heads if proj == "attn_q" else spec.kv_heads)
            _add(writer, f"blk.{i}.{proj}.weight", weight, layer[proj])
            if arch == "qwen2" and proj in ("attn_q", "attn_k", "attn_v"):
                _add(writer, f"blk.{i}.{proj}.bias", rand(shape[0], scale=0.1), Q.F32)
    _add(writer, "output_norm.weight", 1 + rand(spec.hidden, scale=0.1), Q.F32)
    if arch == "qwen2":
        _add(writer, "output.weight", rand(vocab, spec.hidden, scale=0.3), Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
