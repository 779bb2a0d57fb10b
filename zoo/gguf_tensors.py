"""GGUF tensors as the block-local tensors of our embed, layer and head blocks.

- Names: llama.cpp's (`blk.3.attn_q.weight`) become the runtime's (`self_attn.q_proj.weight`).
- Types: F32, F16 and BF16 stay as they are; Q4_0 and Q4_1 projections become 4-bit weights in the
  canonical layout without loss (`kernels.w4a16_gguf`); every other type `gguf.quants` can decode
  (Q8_0, K-quants, …) is dequantized exactly to fp32; the rest are refused by name. With
  `dequantize=True` every tensor is stored dense in fp32, the model's dtype.
- llama's q/k rows: llama.cpp's converter interleaves the two rotary halves of every head; the
  rows are put back in Hugging Face's order, as `transformers` does. For a 4-bit weight the output
  rows are the columns of its codes, scales, zeros and offsets, so that is lossless too.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kernels.w4a16_format import PackedW4
from kernels.w4a16_gguf import BLOCK_BYTES, packed_from_gguf_q4
from kernels.w4a16_import import QuantizedImportError
from runtime.linear import packed_tensors
from runtime.model_config import ModelConfig
from zoo.gguf_file import GGUFError, GGUFTensor

_BLOCK_NAMES = {
    "token_embd.weight": ("embed", "embed_tokens.weight"),
    "output_norm.weight": ("head", "norm.weight"),
    "output.weight": ("head", "lm_head.weight"),
}
_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_AS_IS = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
_LINEARS = {v for k, v in _LAYER_NAMES.items() if not k.endswith("_norm")}


class SplitTensors(NamedTuple):
    """Block-local tensors of the embed block, each layer block and the head block."""

    embed: dict[str, torch.Tensor]
    layers: list[dict[str, torch.Tensor]]
    head: dict[str, torch.Tensor]


def rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """Indices that take llama.cpp's q/k rows to Hugging Face's: row (h, i, j) of GGUF's
    [heads, rows/heads/2, 2] is row (h, j, i) of HF's [heads, 2, rows/heads/2]."""
    if heads < 1 or rows % (2 * heads):
        raise GGUFError(f"a q/k projection of {rows} rows cannot hold {heads} rotary heads")
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(rows)


def _dense(t: GGUFTensor, to_fp32: bool) -> torch.Tensor:
    """The tensor dense: F32/F16/BF16 as stored (fp32 with `to_fp32`), any other type dequantized to fp32."""
    if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        tensor = torch.from_numpy(np.array(t.data)).reshape(t.shape)
        return tensor.float() if to_fp32 else tensor
    try:
        # The reader gives BF16 as raw bytes (numpy has no bfloat16); gguf widens it to fp32 exactly.
        values = gguf_dequantize(np.asarray(t.data), t.qtype)
    except NotImplementedError:
        raise GGUFError(f"GGUF tensor {t.name!r} has type {t.qtype.name}, which cannot be imported") from None
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(t.shape)
    return tensor.to(_AS_IS[t.qtype]) if t.qtype in _AS_IS and not to_fp32 else tensor


def _permute_packed(packed: PackedW4, order: torch.Tensor) -> PackedW4:
    return packed._replace(
        qweight=packed.qweight[:, order].contiguous(),
        scales=packed.scales[:, order].contiguous(),
        zeros=None if packed.zeros is None else packed.zeros[:, order].contiguous(),
        offsets=None if packed.offsets is None else packed.offsets[:, order].contiguous(),
    )


def _projection(
    t: GGUFTensor, local: str, order: torch.Tensor | None, dequantize: bool
) -> dict[str, torch.Tensor]:
    prefix, _, suffix = local.rpartition(".")
    if suffix == "weight" and prefix in _LINEARS and t.qtype in BLOCK_BYTES and not dequantize:
        if len(t.shape) != 2:
            raise GGUFError(f"GGUF tensor {t.name!r} is not a matrix")
        try:
            packed = packed_from_gguf_q4(np.asarray(t.data), int(t.qtype), (t.shape[0], t.shape[1]))
        except QuantizedImportError as exc:
            raise GGUFError(f"GGUF tensor {t.name!r}: {exc}") from exc
        if order is not None:
            packed = _permute_packed(packed, order)
        return packed_tensors(prefix, packed)
    tensor = _dense(t, dequantize)
    if order is not None:
        tensor = tensor[order].contiguous()
    return {local: tensor}


def split_gguf_tensors(
    tensors: dict[str, GGUFTensor], config: ModelConfig, arch: str, dequantize: bool
) -> SplitTensors:
    """Every tensor of the file in its block, converted (see the module docstring)."""
    out = SplitTensors({}, [{} for _ in range(config.num_layers)], {})
    for name, t in tensors.items():
        if name in _BLOCK_NAMES:
            kind, local = _BLOCK_NAMES[name]
            if kind == "head" and name == "output.weight" and config.tie_word_embeddings:
                continue
            (out.embed if kind == "embed" else out.head)[local] = _dense(t, dequantize)
            continue
        m = _LAYER.match(name)
        if m is None or m.group(2) not in _LAYER_NAMES:
            raise GGUFError(f"GGUF tensor {name[:80]!r} is not part of a {arch} model")
        index = int(m.group(1))
        if index >= config.num_layers:
            raise GGUFError(
                f"GGUF tensor {name!r} is for layer {index}, but the model has {config.num_layers}"
            )
        order = None
        if arch == "llama" and m.group(2) in ("attn_q", "attn_k"):
            heads = config.num_heads if m.group(2) == "attn_q" else config.num_kv_heads
            order = rope_row_order(t.shape[0], heads)
        local = f"{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
        out.layers[index].update(_projection(t, local, order, dequantize))
    return out
