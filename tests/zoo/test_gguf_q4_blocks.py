"""Q4_0/Q4_1 projections imported from a GGUF file are the file's weights bit for bit, as 4-bit blocks.

Two independent references: the `gguf` package's own reader and dequantizer for every projection,
and `transformers`' loaded weights for llama's q/k, whose rows llama.cpp permuted and the import
must put back (a 4-bit weight's output rows are the columns of its codes, scales, zeros, offsets).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM

from kernels.w4a16_format import PackedW4, dequantize
from runtime.linear import Int4Linear, make_linear
from tests.zoo.gguf_files import LAYER_TYPES, TinySpec, write_tiny_gguf
from tests.zoo.test_gguf_import import last_logits
from tests.zoo.zoo_helpers import open_zoo
from zoo.gguf_import import GGUFImport, import_gguf

Q4 = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
PROJ = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, GGUFImport]]:
    path = write_tiny_gguf(tmp_path_factory.mktemp("q4") / "llama.gguf", TinySpec("llama"), seed=3)
    with import_gguf(path) as imported:
        yield path, imported


def packed_of(imported: GGUFImport, layer: int, proj: str, shape: tuple[int, int]) -> PackedW4:
    linear = make_linear(imported.split.blocks[1 + layer].tensors, proj, shape[0], shape[1], False, "test")
    assert isinstance(linear, Int4Linear)
    return linear.packed


def q4_projections() -> list[tuple[int, str]]:
    return [(i, p) for i, types in enumerate(LAYER_TYPES) for p, t in types.items() if t in Q4]


def test_q4_blocks_equal_the_gguf_readers_weights_bit_for_bit(llama: tuple[Path, GGUFImport]) -> None:
    path, imported = llama
    reader = {t.name: t for t in GGUFReader(path).tensors}
    seen = set()
    for layer, proj in q4_projections():
        tensor = reader[f"blk.{layer}.{proj}.weight"]
        expected = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type))
        packed = packed_of(imported, layer, PROJ[proj], tuple(expected.shape))  # type: ignore[arg-type]
        assert packed.group_size == 32
        seen.add(tensor.tensor_type)
        if tensor.tensor_type == GGMLQuantizationType.Q4_1:
            assert packed.offsets is not None
        ours = dequantize(packed)
        if proj in ("attn_q", "attn_k"):
            continue  # rows permuted: checked against transformers below
        assert torch.equal(ours, expected), (layer, proj)
    assert seen == set(Q4)


def test_q4_q_and_k_rows_match_transformers_bit_for_bit(llama: tuple[Path, GGUFImport]) -> None:
    path, imported = llama
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    checked = 0
    for layer, proj in q4_projections():
        if proj not in ("attn_q", "attn_k"):
            continue
        module = model.model.layers[layer].get_submodule(PROJ[proj])
        expected = module.weight.detach()
        ours = dequantize(packed_of(imported, layer, PROJ[proj], tuple(expected.shape)))
        assert torch.equal(ours, expected), (layer, proj)
        checked += 1
    assert checked == 4  # q and k of layers 0 (Q4_1) and 1 (Q4_0)


def test_4bit_path_matches_its_reference(llama: tuple[Path, GGUFImport]) -> None:
    _, imported = llama
    gen = torch.Generator().manual_seed(0)
    for layer, proj in q4_projections():
        tensors = imported.split.blocks[1 + layer].tensors
        qweight = tensors[f"{PROJ[proj]}.qweight"]
        shape = (int(qweight.shape[1]), int(qweight.shape[0]) * 8)
        packed = packed_of(imported, layer, PROJ[proj], shape)
        x = torch.randn(5, shape[1], generator=gen)
        reference = x @ dequantize(packed).t()
        out = Int4Linear(packed, None)(x)
        scale = float(reference.abs().max())
        assert float((out - reference).abs().max()) <= 1e-2 * scale, (layer, proj)


def test_dequantize_option_stores_dense_fp32(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "llama.gguf", TinySpec("llama"), seed=3)
    with import_gguf(path, dequantize=True) as imported:
        for block in imported.split.blocks:
            assert all(t.dtype == torch.float32 for t in block.tensors.values()), block.kind
            assert not any(name.endswith(".qweight") for name in block.tensors)
            assert "quantization" not in block.fields
    reader = {t.name: t for t in GGUFReader(path).tensors}
    tensor = reader["blk.0.ffn_up.weight"]
    dense = imported.split.blocks[1].tensors["mlp.up_proj.weight"]
    assert torch.equal(dense, torch.from_numpy(np.asarray(gguf_dequantize(tensor.data, tensor.tensor_type))))


def test_other_types_are_dequantized_exactly_and_bf16_kept(tmp_path: Path) -> None:
    """Q5_0 and the K-quant Q6_K are dequantized exactly (fp32), BF16 is stored as bf16; the chain
    of such a file gives transformers' logits."""
    spec = TinySpec("llama", hidden=256, heads=4, kv_heads=2, intermediate=256)
    types = [
        {**LAYER_TYPES[0], "ffn_down": GGMLQuantizationType.Q6_K, "ffn_up": GGMLQuantizationType.Q5_0},
        {**LAYER_TYPES[0], "attn_v": GGMLQuantizationType.BF16, "attn_output": GGMLQuantizationType.Q6_K},
    ]
    path = write_tiny_gguf(tmp_path / "k.gguf", spec, seed=9, layer_types=types)
    reader = {t.name: t for t in GGUFReader(path).tensors}
    with import_gguf(path) as imported:
        layers = [b.tensors for b in imported.split.blocks[1:3]]
    for layer, gguf_name, name in (
        (0, "ffn_down", "mlp.down_proj.weight"),
        (0, "ffn_up", "mlp.up_proj.weight"),
        (1, "attn_output", "self_attn.o_proj.weight"),
        (1, "attn_v", "self_attn.v_proj.weight"),
    ):
        tensor = reader[f"blk.{layer}.{gguf_name}.weight"]
        expected = torch.from_numpy(np.asarray(gguf_dequantize(tensor.data, tensor.tensor_type)))
        ours = layers[layer][name]
        assert ours.dtype == (torch.bfloat16 if gguf_name == "attn_v" else torch.float32)
        assert torch.equal(ours.float(), expected), name
        assert bool(expected.abs().max() > 0)
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("k", path, dequantize=True)
    chain = zoo.load_chain(zoo.resolve(None, "k"), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32)
    prompt = [5, 17, 99, 254, 31, 8, 77]
    with torch.no_grad():
        expected_logits = model(torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(last_logits(chain, prompt), expected_logits, atol=1e-4, rtol=1e-4)
