"""A GGUF fine-tune composed from a base GGUF and a few trained layers, the way llama.cpp would write it.

The demo's partial fine-tune ships only its trained layer (Hugging Face names, fp16). To register it
as a fine-tune of the 4-bit base, the base's file is copied tensor by tensor with its raw bytes (so
every untouched layer, the embedding and the head are byte-identical and dedupe against the base's
blocks), and the trained layers are written as F16 (projections) and F32 (norms). q and k rows get
llama.cpp's rotary permutation, as `convert_hf_to_gguf.py` applies it, because GGUF readers undo it.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch

_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


class ComposeError(ValueError):
    """A tensor that cannot be placed in the base GGUF."""


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k row order to GGUF's (llama.cpp's `permute`): per head, interleave the two rotary halves."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_name(hf_name: str) -> str:
    m = _HF_LAYER.match(hf_name)
    if m is None or m.group(2) not in _HF_TO_GGUF:
        raise ComposeError(f"{hf_name}: not a decoder layer weight this composer knows")
    return f"blk.{m.group(1)}.{_HF_TO_GGUF[m.group(2)]}.weight"


def _field(reader: gguf.GGUFReader, key: str) -> int:
    return int(reader.fields[key].contents())


def compose_finetune_gguf(base: Path, layers: dict[str, torch.Tensor], out: Path) -> Path:
    """Write `out`: `base` with the given HF-named layer tensors replaced (F16 matrices, F32 vectors)."""
    reader = gguf.GGUFReader(str(base))
    arch = str(reader.fields["general.architecture"].contents())
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv")
    replaced: dict[str, np.ndarray] = {}
    for hf_name, tensor in layers.items():
        t = tensor.detach().to(torch.float32)
        if hf_name.endswith("self_attn.q_proj.weight"):
            t = llama_cpp_permute(t, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            t = llama_cpp_permute(t, kv_heads)
        replaced[gguf_name(hf_name)] = t.numpy().astype(np.float16 if t.ndim == 2 else np.float32)
    present = {rt.name: rt for rt in reader.tensors}
    for name, array in replaced.items():
        if name not in present:
            raise ComposeError(f"{name} is not in {base.name}")
        want = tuple(int(d) for d in reversed(present[name].shape.tolist()))
        if array.shape != want:
            raise ComposeError(f"{name}: shape {array.shape}, the base has {want}")
    writer = gguf.GGUFWriter(str(out), arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for rt in reader.tensors:
        if rt.name in replaced:
            array = replaced[rt.name]
            writer.add_tensor_info(rt.name, array.shape, array.dtype, array.nbytes)
        else:
            writer.add_tensor_info(rt.name, rt.data.shape, rt.data.dtype, rt.data.nbytes, rt.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for rt in reader.tensors:
        writer.write_tensor_data(replaced.get(rt.name, rt.data), tensor_endianess=reader.endianess)
    writer.close()
    return out
